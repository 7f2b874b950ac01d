# Resizing a uvdpa blk device under a running guest driver (run in the 6.12 guest by
# crates/daemon/tests/vduse_resize.rs): a 64 MiB RAM disk over VDUSE, bound to virtio_blk as
# vda, gets a pattern written at 32 MiB; `uvdpa dev set rz0 capacity 128M` changes the
# capacity and raises the config interrupt (VDUSE_DEV_SET_CONFIG +
# VDUSE_DEV_INJECT_CONFIG_IRQ), virtio_blk re-reads `capacity` and /sys/block/vda/size
# becomes 262144 sectors within a deadline; the pattern still reads back and a write at
# 100 MiB (past the old end) succeeds and reads back. Then a shrink to 96M: the size follows
# and the pattern at 32 MiB is still there.
# env: UVDPA_BIN (the uvdpa binary)
# shellcheck shell=sh
set -u
. "$UVDPA_LIB"
load_vduse_modules blk || die "loading the VDUSE modules"
uvdpa="${UVDPA_BIN:?}"
command -v jq > /dev/null || die "jq not installed"
run=/tmp/uvdpa
ctl="$run/uvdpa.ctl"
mkdir -p "$run"
cat > "$run/c.toml" <<T
[[device]]
name = "rz0"
mgmtdev = "blk"
backend = "ram"
size = "64M"
transport = "vduse"
T
UVDPA_LOG=info "$uvdpa" daemon --run-dir "$run" --config "$run/c.toml" >> "$UVDPA_OUT/daemon.log" 2>&1 &
daemon=$!
wait_blockdev vda 60 || { tail -40 "$UVDPA_OUT/daemon.log" >&2; die "no /dev/vda"; }
uv() { deadline 30 "$uvdpa" --ctl "$ctl" "$@"; }

# wait_size SECTORS SECS: until /sys/block/vda/size reads SECTORS
wait_size() {
    _end=$(($(date +%s) + $2))
    while [ "$(cat /sys/block/vda/size)" != "$1" ]; do
        [ "$(date +%s)" -lt "$_end" ] || return 1
        sleep 0.1
    done
}

size=$(cat /sys/block/vda/size)
[ "$size" = 131072 ] || die "vda has $size sectors, not 131072 (64 MiB)"
say "vda is 64 MiB ($size sectors)"

# A 1 MiB pattern at 32 MiB, written and read back around the page cache.
yes "rz0-pattern-" | head -c 1048576 > /tmp/pat
deadline 30 dd if=/tmp/pat of=/dev/vda bs=1M seek=32 count=1 oflag=direct conv=notrunc,fsync status=none ||
    die "writing the pattern"
# Past the end: the kernel refuses before the device sees it.
yes "rz0-far-" | head -c 1048576 > /tmp/far
if deadline 30 dd if=/tmp/far of=/dev/vda bs=1M seek=100 count=1 oflag=direct conv=notrunc,fsync status=none 2> /dev/null; then
    die "a write at 100 MiB succeeded on a 64 MiB disk"
fi

# Grow.
out=$(uv dev set rz0 capacity 128M) || die "dev set rz0 capacity 128M failed"
say "dev set: $out"
case "$out" in *"driver notified"*) ;; *) die "the driver was not notified: $out" ;; esac
wait_size 262144 10 || die "/sys/block/vda/size is $(cat /sys/block/vda/size), not 262144, 10 s after the resize"
say "vda grew to 128 MiB ($(cat /sys/block/vda/size) sectors)"
dmesg | grep -i "vda" | grep -i "size" | tail -2 >&2
deadline 30 dd if=/dev/vda of=/tmp/back bs=1M skip=32 count=1 iflag=direct status=none || die "reading the pattern back"
cmp -s /tmp/pat /tmp/back || die "the pattern written before the resize does not read back"
say "the pattern written before the resize reads back"
deadline 30 dd if=/tmp/far of=/dev/vda bs=1M seek=100 count=1 oflag=direct conv=notrunc,fsync status=none ||
    die "the write at 100 MiB failed after the resize"
deadline 30 dd if=/dev/vda of=/tmp/back bs=1M skip=100 count=1 iflag=direct status=none || die "reading 100 MiB back"
cmp -s /tmp/far /tmp/back || die "the block at 100 MiB does not read back"
say "a write at 100 MiB succeeds and reads back"
cap=$(uv -j dev show rz0 | jq -r '.dev[0].capacity') || die "dev show"
[ "$cap" = 134217728 ] || die "dev show reports capacity $cap"
sectors=$(uv -j dev config show rz0 | jq -r '.config.capacity') || die "dev config show"
[ "$sectors" = 262144 ] || die "dev config show reports capacity $sectors"
say "dev show and dev config show report 128 MiB"

# Shrink below the block at 100 MiB.
uv dev set rz0 capacity 96M > /dev/null || die "dev set rz0 capacity 96M failed"
wait_size 196608 10 || die "/sys/block/vda/size is $(cat /sys/block/vda/size), not 196608, 10 s after the shrink"
deadline 30 dd if=/dev/vda of=/tmp/back bs=1M skip=32 count=1 iflag=direct status=none || die "reading the pattern after the shrink"
cmp -s /tmp/pat /tmp/back || die "the pattern does not read back after the shrink"
say "vda shrank to 96 MiB and the pattern still reads back"

kill "$daemon"
wait "$daemon"
say "resize test passed"
