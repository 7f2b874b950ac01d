# Daemon restart on VDUSE (run in the 6.12 guest by crates/daemon/tests/vduse_restart.rs):
# a uvdpa blk device (file backend in the guest's tmpfs) over VDUSE takes O_DIRECT writes of
# stamped 64 KiB blocks; the daemon is SIGKILLed in the middle, the writer's requests wait
# (the kernel keeps the device), the same daemon command is started again, takes the device
# over from its reconnect log, and the writer finishes. Then every block the writer saw
# acknowledged must read back with its stamp, and no write may have failed.
# Four writers run at once (blocks k, k+4, ...), so requests are in flight when the daemon
# dies and the new one resubmits them from the log.
# env: UVDPA_BIN (the uvdpa binary), BLOCKS (default 240, a multiple of 4)
# shellcheck shell=sh
set -u
. "$UVDPA_LIB"
load_vduse_modules blk || die "loading the VDUSE modules"
uvdpa="${UVDPA_BIN:?}"
blocks="${BLOCKS:-240}"
run=/tmp/uvdpa
mkdir -p "$run"
truncate -s 64M /tmp/img || die "creating /tmp/img"
cat > "$run/c.toml" <<T
[[device]]
name = "rs0"
mgmtdev = "blk"
backend = "file"
path = "/tmp/img"
transport = "vduse"
T
start_daemon() {
    UVDPA_LOG=info "$uvdpa" daemon --run-dir "$run" --config "$run/c.toml" >> "$UVDPA_OUT/daemon.log" 2>&1 &
    daemon=$!
}
start_daemon
first=$daemon
wait_blockdev vda 60 || { tail -40 "$UVDPA_OUT/daemon.log" >&2; die "no /dev/vda"; }

# The writers: fio writes 32 MiB in 4 KiB blocks with 32 requests in flight (crc32c
# verify headers in every block); alongside, four dd writers stamp 64 KiB blocks
# (block i holds "rs0-block-<i>-" repeated) in the second half of the disk, each index going
# to /tmp/acked once dd returned (O_DIRECT + fsync: the write completed).
cat > /tmp/writer.sh <<'W'
i=$2
while [ "$i" -lt "$1" ]; do
    yes "rs0-block-$i-" | head -c 65536 > /tmp/w.$2
    dd if=/tmp/w.$2 of=/dev/vda bs=64k seek=$((512 + i)) count=1 oflag=direct conv=notrunc,fsync status=none || { echo "write $i failed" >> /tmp/errors; exit 1; }
    echo "$i" >> /tmp/acked
    i=$((i + 4))
done
W
: > /tmp/acked
cat > /tmp/writers.sh <<'W'
fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --rw=write \
    --bs=4k --size=32M --verify=crc32c --do_verify=0 --output=/tmp/fio-write.out &
for k in 0 1 2 3; do sh /tmp/writer.sh "$1" "$k" & done
fail=0
for k in 1 2 3 4 5; do wait %$k || fail=1; done
exit $fail
W
sh /tmp/writers.sh "$blocks" &
writer=$!

# kill the daemon once the writers are under way, at a moment the block layer has writes in
# flight (/sys/block/vda/inflight: reads, writes), so the new daemon has some to resubmit
t=0
while [ "$(wc -l < /tmp/acked)" -lt 8 ] && [ "$t" -lt 600 ]; do sleep 0.1; t=$((t + 1)); done
t=0
while [ "$(awk '{print $2}' /sys/block/vda/inflight)" -lt 4 ] && [ "$t" -lt 2000 ]; do t=$((t + 1)); done
before=$(wc -l < /tmp/acked)
[ "$before" -ge 8 ] || die "the writers did not get going ($before blocks)"
kill -9 "$first"
say "daemon SIGKILLed after $before acknowledged writes, $(awk '{print $2}' /sys/block/vda/inflight) writes in flight"
sleep 2
stalled=$(wc -l < /tmp/acked)
[ "$stalled" -le $((before + 4)) ] || die "writes kept completing without a daemon ($before -> $stalled)"
kill -0 "$writer" 2> /dev/null || die "the writer ended while the daemon was dead"
[ ! -e /tmp/errors ] || die "a write failed while the daemon was dead: $(cat /tmp/errors)"
say "writer waiting with $stalled acknowledged; restarting the daemon"
start_daemon

# the writer finishes within a wall-clock deadline
t=0
while kill -0 "$writer" 2> /dev/null && [ "$t" -lt 1800 ]; do sleep 0.1; t=$((t + 1)); done
kill -0 "$writer" 2> /dev/null && { tail -40 "$UVDPA_OUT/daemon.log" >&2; die "the writer hung after the restart ($(wc -l < /tmp/acked) acknowledged)"; }
wait "$writer" || die "the writer failed: $(cat /tmp/errors 2> /dev/null)"
acked=$(wc -l < /tmp/acked)
[ "$acked" -eq "$blocks" ] || die "$acked of $blocks writes acknowledged"
grep -q "reattached to the VDUSE device" "$UVDPA_OUT/daemon.log" || die "the second daemon did not reattach"
say "all $blocks writes acknowledged across the restart"

# every acknowledged block reads back (through the device and in the file)
i=0
while [ "$i" -lt "$blocks" ]; do
    yes "rs0-block-$i-" | head -c 65536 > /tmp/want
    deadline 30 dd if=/dev/vda of=/tmp/got bs=64k skip=$((512 + i)) count=1 iflag=direct status=none || die "reading block $i"
    cmp -s /tmp/want /tmp/got || die "block $i does not read back"
    i=$((i + 1))
done
say "every acknowledged block reads back"
deadline 120 fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --rw=write \
    --bs=4k --size=32M --verify=crc32c --verify_only --verify_fatal=1 --output=/tmp/fio-verify.out ||
    { cat /tmp/fio-verify.out >&2; die "fio's blocks do not verify"; }
say "fio's 32 MiB written across the restart verify"
cmp -n 67108864 /tmp/img /dev/vda || die "the image differs from the device"
kill "$daemon"
wait "$daemon"
say "restart test passed"
