# The peer self-test (run in the VDUSE guest by run.sh; crates/daemon/tests/vduse_peer_selftest.rs
# runs it too): qemu-storage-daemon's vduse-blk export, bound to virtio_vdpa with iproute2's
# vdpa, proves the guest tooling and gives the benchmarks their reference.
#   qsd0: null-co, 1 GiB, read-zeroes=on: reads come back as zeros, writes are dropped
#   qsd1: a 256 MiB file image in the guest's tmpfs: O_DIRECT write, read back, compare;
#         fio with verify=crc32c if fio is installed
# Both devices are deleted with vdpa dev del, then qemu-storage-daemon quits on SIGTERM.
# shellcheck shell=sh
set -u
. "$UVDPA_LIB"

load_vduse_modules blk || die "loading the VDUSE modules"
command -v qemu-storage-daemon > /dev/null || die "qemu-storage-daemon not installed"
command -v vdpa > /dev/null || die "vdpa (iproute2) not installed"

truncate -s 256M /tmp/img || die "creating /tmp/img"
say "starting qemu-storage-daemon"
qemu-storage-daemon \
    --blockdev driver=null-co,node-name=n0,size=1073741824,read-zeroes=on \
    --export type=vduse-blk,id=e0,node-name=n0,name=qsd0,writable=on,num-queues=1 \
    --blockdev driver=file,node-name=f1,filename=/tmp/img,aio=threads \
    --export type=vduse-blk,id=e1,node-name=f1,name=qsd1,writable=on,num-queues=1 \
    > /tmp/qsd.log 2>&1 &
qsd=$!
trap 'kill -9 $qsd 2> /dev/null' EXIT
wait_path /dev/vduse/qsd0 20 $qsd && wait_path /dev/vduse/qsd1 20 $qsd ||
    { cat /tmp/qsd.log >&2; die "qemu-storage-daemon made no VDUSE devices"; }
vdpa mgmtdev show
vdpa_add qsd0 || die "vdpa dev add qsd0"
wait_blockdev vda 30 || die "qsd0 gave no /dev/vda"
vdpa_add qsd1 || die "vdpa dev add qsd1"
wait_blockdev vdb 30 || die "qsd1 gave no /dev/vdb"
vdpa dev show
# 1 GiB = 2097152 sectors, 256 MiB = 524288
[ "$(cat /sys/block/vda/size)" = 2097152 ] || die "vda is $(cat /sys/block/vda/size) sectors, not qsd0's 1 GiB"
[ "$(cat /sys/block/vdb/size)" = 524288 ] || die "vdb is $(cat /sys/block/vdb/size) sectors, not qsd1's 256 MiB"
say "vda (null-co) and vdb (tmpfs image) are up"

# null-co: a direct read of zeros, a direct write that succeeds
deadline 60 dd if=/dev/vda of=/tmp/zeros bs=64k count=64 iflag=direct status=none || die "reading vda"
head -c 4194304 /dev/zero | cmp - /tmp/zeros || die "vda read back non-zero data"
deadline 60 dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct status=none || die "writing vda"

# the image: a pattern written with O_DIRECT at offset 8 MiB, read back with O_DIRECT
head -c 4194304 /dev/urandom > /tmp/pattern
deadline 60 dd if=/tmp/pattern of=/dev/vdb bs=64k seek=128 oflag=direct conv=fsync status=none ||
    die "writing vdb"
deadline 60 dd if=/dev/vdb of=/tmp/back bs=64k skip=128 count=64 iflag=direct status=none || die "reading vdb"
cmp /tmp/pattern /tmp/back || die "vdb read back other data than written"
# and the host-side view: the same bytes in the image file qsd serves
cmp -n 4194304 -i 8388608:0 /tmp/img /tmp/pattern || die "the image file does not hold the pattern"
say "O_DIRECT write + read-back verified on vdb"

if command -v fio > /dev/null; then
    deadline 120 fio --name=verify --filename=/dev/vdb --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --output-format=terse \
        > /tmp/fio.out 2>&1 || { cat /tmp/fio.out >&2; die "fio verify on vdb"; }
    say "fio randwrite + crc32c verify passed on vdb"
else
    say "fio not installed: skipping the fio verify"
fi

vdpa_del qsd0 || die "vdpa dev del qsd0"
vdpa_del qsd1 || die "vdpa dev del qsd1"
[ ! -e /sys/block/vda ] && [ ! -e /sys/block/vdb ] || die "the disks are still there after vdpa dev del"
kill -TERM $qsd
end=$(($(date +%s) + 20))
while kill -0 $qsd 2> /dev/null; do
    [ "$(date +%s)" -lt "$end" ] || { cat /tmp/qsd.log >&2; die "qemu-storage-daemon did not quit on SIGTERM"; }
    sleep 0.1
done
wait $qsd
rc=$?
trap - EXIT
[ -z "${UVDPA_OUT:-}" ] || [ ! -w "$UVDPA_OUT" ] || cp /tmp/qsd.log "$UVDPA_OUT/qsd.log" 2> /dev/null || true
[ "$rc" -eq 0 ] || { cat /tmp/qsd.log >&2; die "qemu-storage-daemon exited with status $rc"; }
say "qemu-storage-daemon quit; self-test passed"
