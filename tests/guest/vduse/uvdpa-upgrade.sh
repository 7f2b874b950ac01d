# Live upgrade on VDUSE (run in the 6.12 guest by crates/daemon/tests/vduse_upgrade.rs): a
# uvdpa blk device (file backend in the guest's tmpfs) over VDUSE takes O_DIRECT writes of
# stamped 64 KiB blocks and a fio verify run while `uvdpa daemon --takeover` replaces the
# daemon UPGRADES times. The kernel's driver must never notice: no write fails, each old
# daemon exits 0 after handing the device over, the vDPA device never leaves the bus, and
# every acknowledged block reads back. PACKED=1 offers packed virtqueues (`unoffer = []`).
# env: UVDPA_BIN (the uvdpa binary), UPGRADES (default 10), BLOCKS (default 240, a
# multiple of 4), PACKED (0/1)
# shellcheck shell=sh
set -u
. "$UVDPA_LIB"
load_vduse_modules blk || die "loading the VDUSE modules"
uvdpa="${UVDPA_BIN:?}"
upgrades="${UPGRADES:-10}"
blocks="${BLOCKS:-240}"
run=/tmp/uvdpa
mkdir -p "$run"
truncate -s 64M /tmp/img || die "creating /tmp/img"
cat > "$run/c.toml" <<T
[[device]]
name = "up0"
mgmtdev = "blk"
backend = "file"
path = "/tmp/img"
transport = "vduse"
T
[ "${PACKED:-0}" = 1 ] && echo 'unoffer = []' >> "$run/c.toml"
UVDPA_LOG=info "$uvdpa" daemon --run-dir "$run" --config "$run/c.toml" >> "$UVDPA_OUT/daemon.log" 2>&1 &
daemon=$!
wait_blockdev vda 60 || { tail -40 "$UVDPA_OUT/daemon.log" >&2; die "no /dev/vda"; }
if [ "${PACKED:-0}" = 1 ]; then
    [ "$(cut -c35 /sys/block/vda/device/features)" = 1 ] || die "VIRTIO_F_RING_PACKED not negotiated: $(cat /sys/block/vda/device/features)"
    say "packed virtqueues negotiated"
fi

cat > /tmp/writer.sh <<'W'
i=$2
while [ "$i" -lt "$1" ]; do
    yes "up0-block-$i-" | head -c 65536 > /tmp/w.$2
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
t=0
while [ "$(wc -l < /tmp/acked)" -lt 4 ] && [ "$t" -lt 600 ]; do sleep 0.1; t=$((t + 1)); done

n=0
while [ "$n" -lt "$upgrades" ]; do
    n=$((n + 1))
    old=$daemon
    UVDPA_LOG=info "$uvdpa" daemon --takeover --run-dir "$run" --config "$run/c.toml" >> "$UVDPA_OUT/daemon.log" 2>&1 &
    daemon=$!
    # the old daemon exits once the new one serves
    t=0
    while kill -0 "$old" 2> /dev/null && [ "$t" -lt 300 ]; do sleep 0.1; t=$((t + 1)); done
    kill -0 "$old" 2> /dev/null && { tail -30 "$UVDPA_OUT/daemon.log" >&2; die "upgrade $n: the old daemon did not exit"; }
    wait "$old" || die "upgrade $n: the old daemon exited with $?"
    kill -0 "$daemon" 2> /dev/null || { tail -30 "$UVDPA_OUT/daemon.log" >&2; die "upgrade $n: the new daemon is not running"; }
    [ -e /sys/bus/vdpa/devices/up0 ] || die "upgrade $n: the vDPA device left the bus"
    [ ! -e /tmp/errors ] || die "upgrade $n: a write failed: $(cat /tmp/errors)"
    say "upgrade $n done, $(wc -l < /tmp/acked) writes acknowledged"
    sleep 0.5
done
pauses=$(grep -c "takeover: 1 devices from pid" "$UVDPA_OUT/daemon.log")
[ "$pauses" -eq "$upgrades" ] || die "$pauses of $upgrades takeovers reported"

t=0
while kill -0 "$writer" 2> /dev/null && [ "$t" -lt 1800 ]; do sleep 0.1; t=$((t + 1)); done
kill -0 "$writer" 2> /dev/null && { tail -40 "$UVDPA_OUT/daemon.log" >&2; die "the writer hung ($(wc -l < /tmp/acked) acknowledged)"; }
wait "$writer" || die "the writer failed: $(cat /tmp/errors 2> /dev/null)"
acked=$(wc -l < /tmp/acked)
[ "$acked" -eq "$blocks" ] || die "$acked of $blocks writes acknowledged"
say "all $blocks writes acknowledged across $upgrades upgrades"
i=0
while [ "$i" -lt "$blocks" ]; do
    yes "up0-block-$i-" | head -c 65536 > /tmp/want
    deadline 30 dd if=/dev/vda of=/tmp/got bs=64k skip=$((512 + i)) count=1 iflag=direct status=none || die "reading block $i"
    cmp -s /tmp/want /tmp/got || die "block $i does not read back"
    i=$((i + 1))
done
say "every acknowledged block reads back"
deadline 120 fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --rw=write \
    --bs=4k --size=32M --verify=crc32c --verify_only --verify_fatal=1 --output=/tmp/fio-verify.out ||
    { cat /tmp/fio-verify.out >&2; die "fio's blocks do not verify"; }
say "fio's 32 MiB written across the upgrades verify"
cmp -n 67108864 /tmp/img /dev/vda || die "the image differs from the device"
dmesg | grep -i "virtio_blk\|vduse" | grep -i "reset\|error\|timeout" && die "the kernel logged a device problem"
kill "$daemon"
wait "$daemon"
say "upgrade test passed"
