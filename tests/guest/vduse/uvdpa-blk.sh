# uvdpa's virtio-blk over VDUSE in the 6.12 guest (run by run.sh;
# crates/daemon/tests/vduse_guest.rs runs it). One `uvdpa daemon` (UVDPA_LOG=debug, log in
# /out) serves the devices of the chosen cases from a config file it writes; each device
# binds itself to the vDPA bus and virtio_blk makes a disk of it, found through
# /sys/bus/vdpa/devices/NAME/virtio*/block/.
#
# env: UVDPA_BIN   the uvdpa binary (default: $UVDPA_REPO/target/debug/uvdpa)
#      UVDPA_CASES the cases to run, in order (default: all of them):
#   ram_packed       ram 64M, 1 queue, `unoffer = []` (packed rings offered): the guest
#                    negotiates VIRTIO_F_RING_PACKED; O_DIRECT write + read-back at 4 KiB,
#                    64 KiB and 1 MiB; fio randwrite verify=crc32c iodepth 16; discard and
#                    write-zeroes (what the queue limits advertise) read back as zeros;
#                    mkfs.ext4, files, umount, e2fsck -fn clean, remount, checksums;
#                    dev show (transport, vdpa, kernel_dev) and vstats counters
#   file_2q          file backend (/tmp/uvdpa-file.img), queues = 2: two blk-mq hardware
#                    queues, O_DIRECT verify, fio verify with 2 jobs (one per CPU), both
#                    queues' counters move, the image holds the written bytes
#   split_ring       ram 64M, `unoffer = ["VIRTIO_F_RING_PACKED"]`: no packed rings
#                    negotiated (dev show and the guest's feature bits); O_DIRECT + fio verify
#   read_only        file backend holding random bytes, read_only = true: ro is 1, writes
#                    fail (within a deadline), O_DIRECT reads return the image's bytes
#   runtime_add_del  `dev add ... transport vduse` through the CLI: a disk appears and
#                    works; `dev del`: the disk, /dev/vduse/NAME and the vDPA device go,
#                    the other devices keep working
# and always, last:
#   shutdown         SIGTERM: the daemon exits 0 and every disk and /dev/vduse node is gone
#
# Prints "UVDPA-CASE: NAME PASS|FAIL" per case; exits non-zero if any failed.
# shellcheck shell=sh
set -u
. "$UVDPA_LIB"
cd /tmp || exit 1

BIN="${UVDPA_BIN:-$UVDPA_REPO/target/debug/uvdpa}"
CASES="${UVDPA_CASES:-ram_packed file_2q split_ring read_only runtime_add_del}"
RUN=/tmp/uvdpa
CTL="$RUN/uvdpa.ctl"
OUT="${UVDPA_OUT:-/tmp}"
touch "$OUT/.w" 2> /dev/null && rm -f "$OUT/.w" || OUT=/tmp
LOG="$OUT/uvdpa-blk-daemon.log"
CFG=/tmp/uvdpa-blk.toml
FILE_IMG=/tmp/uvdpa-file.img
RO_IMG=/tmp/uvdpa-ro.img
MiB=1048576

[ -x "$BIN" ] || die "no uvdpa binary at $BIN"
command -v jq > /dev/null || die "jq not installed"
command -v fio > /dev/null || die "fio not installed"
load_vduse_modules blk || die "loading the VDUSE modules"
load_modules crc32c_generic ext4 || die "loading ext4 (and crc32c for its checksums)"

# --- helpers ---------------------------------------------------------------------------

# uv ARGS...: the CLI against the daemon, with a deadline
uv() { deadline 30 "$BIN" --ctl "$CTL" "$@"; }

# show NAME: `dev show NAME -j` saved as /out/show-NAME.json and printed
show() {
    uv -j dev show "$1" > "/tmp/show-$1.json" || return 1
    cp "/tmp/show-$1.json" "$OUT/" 2> /dev/null
    cat "/tmp/show-$1.json"
}

# jcheck FILE EXPR WHAT: jq -e EXPR on FILE, or die naming WHAT (and the file)
jcheck() {
    jq -e "$2" "$1" > /dev/null || { cat "$1" >&2; echo >&2; die "$3"; }
}

# vstats NAME QIDX: the counters of a queue (`.vstats`)
vstats() {
    uv -j dev vstats show "$1" qidx "$2" > "/tmp/vstats-$1-$2.json" || return 1
    cp "/tmp/vstats-$1-$2.json" "$OUT/" 2> /dev/null
    jq -c .vstats "/tmp/vstats-$1-$2.json"
}

# disk_of NAME: the block device virtio_blk made of vDPA device NAME
disk_of() {
    for _b in /sys/bus/vdpa/devices/"$1"/virtio*/block/*; do
        [ -e "$_b" ] && { echo "${_b##*/}"; return 0; }
    done
    return 1
}

# wait_disk NAME SECS: prints the disk once /sys/block/DISK and /dev/DISK exist
wait_disk() {
    _end=$(($(date +%s) + $2))
    until _d="$(disk_of "$1")"; do
        [ "$(date +%s)" -lt "$_end" ] || { say "vDPA device $1 made no disk within $2 s"; return 1; }
        kill -0 "$DPID" 2> /dev/null || { say "the daemon exited"; return 1; }
        sleep 0.2
    done
    wait_blockdev "$_d" "$2" || return 1
    echo "$_d"
}

# feature_bit NAME BIT: the guest driver's negotiated feature bit (0/1) of vDPA device NAME
feature_bit() {
    _f="$(cat /sys/bus/vdpa/devices/"$1"/virtio*/features)" || return 1
    echo "$_f" | cut -c $(($2 + 1))
}

# odirect_verify DISK [IMAGE]: distinct random patterns written and read back with
# O_DIRECT at 4 KiB (16 blocks at 1 MiB), 64 KiB (16 at 2 MiB) and 1 MiB (8 at 4 MiB);
# then the whole 12 MiB read again with another block size, each pattern at its place;
# IMAGE, if given, must hold them at the same offsets
odirect_verify() {
    _dev="$1" _img="${2:-}"
    for _spec in "4096 256 16" "65536 32 16" "$MiB 4 8"; do
        # shellcheck disable=SC2086
        set -- $_spec
        head -c $(($1 * $3)) /dev/urandom > "/tmp/pat.$1"
        deadline 60 dd if="/tmp/pat.$1" of="/dev/$_dev" bs="$1" seek="$2" count="$3" \
            oflag=direct conv=fsync status=none || die "O_DIRECT write bs=$1 to $_dev"
        deadline 60 dd if="/dev/$_dev" of="/tmp/back.$1" bs="$1" skip="$2" count="$3" \
            iflag=direct status=none || die "O_DIRECT read bs=$1 from $_dev"
        cmp "/tmp/pat.$1" "/tmp/back.$1" || die "$_dev: bs=$1 read back other bytes than written"
    done
    deadline 60 dd if="/dev/$_dev" of=/tmp/back.all bs=131072 count=96 iflag=direct status=none ||
        die "O_DIRECT read of 12 MiB from $_dev"
    for _spec in "4096 256 16" "65536 32 16" "$MiB 4 8"; do
        # shellcheck disable=SC2086
        set -- $_spec
        cmp -n $(($1 * $3)) -i $(($1 * $2)):0 /tmp/back.all "/tmp/pat.$1" ||
            die "$_dev: the bs=$1 pattern is not at offset $(($1 * $2)) when read with bs=128k"
        [ -z "$_img" ] || cmp -n $(($1 * $3)) -i $(($1 * $2)):0 "$_img" "/tmp/pat.$1" ||
            die "$_img does not hold the bs=$1 pattern at offset $(($1 * $2))"
    done
    say "$_dev: O_DIRECT write + read-back verified at 4 KiB, 64 KiB, 1 MiB${_img:+ (and in $_img)}"
}

# fio_verify DISK NUMJOBS: randwrite 4 KiB at iodepth 16, crc32c verify; each job its own
# 16 MiB, one job per CPU
fio_verify() {
    deadline 180 fio --name=verify --filename="/dev/$1" --direct=1 --ioengine=libaio \
        --iodepth=16 --rw=randwrite --bs=4k --size=16M --offset_increment=16M \
        --numjobs="$2" --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting \
        --output-format=terse > /tmp/fio.out 2>&1 || { cat /tmp/fio.out >&2; die "fio verify on $1 ($2 jobs)"; }
    say "$1: fio randwrite + crc32c verify passed ($2 jobs, iodepth 16)"
}

# --- cases -----------------------------------------------------------------------------

case_ram_packed() {
    d="$(wait_disk uv0 30)" || die "uv0 gave no disk"
    show uv0 > /dev/null || die "dev show uv0"
    jcheck /tmp/show-uv0.json '.dev[0] | .transport == "vduse" and .vdpa == "uv0"' \
        "dev show uv0: transport is not vduse or vdpa is not uv0"
    jcheck /tmp/show-uv0.json ".dev[0].kernel_dev == \"$d\"" "dev show uv0: kernel_dev is not $d"
    jcheck /tmp/show-uv0.json '.dev[0].features | index("VIRTIO_F_RING_PACKED") != null' \
        "uv0 offers packed rings (unoffer = []) but VIRTIO_F_RING_PACKED was not negotiated"
    [ "$(feature_bit uv0 34)" = 1 ] || die "the guest's driver did not negotiate packed rings (bit 34)"
    [ "$(cat /sys/block/"$d"/size)" = 131072 ] || die "$d is $(cat /sys/block/"$d"/size) sectors, not 64 MiB"
    say "uv0 is $d, packed rings"

    odirect_verify "$d"
    fio_verify "$d" 1

    # discard and write-zeroes: what the device offers, the queue limits must say
    dmax="$(cat /sys/block/"$d"/queue/discard_max_bytes)"
    wzmax="$(cat /sys/block/"$d"/queue/write_zeroes_max_bytes)"
    say "$d: discard_max_bytes $dmax, write_zeroes_max_bytes $wzmax"
    if jq -e '.dev[0].features | index("VIRTIO_BLK_F_DISCARD") != null' /tmp/show-uv0.json > /dev/null; then
        [ "$dmax" -gt 0 ] || die "VIRTIO_BLK_F_DISCARD negotiated but discard_max_bytes is 0"
        # 3 MiB of pattern at 20 MiB, the middle MiB discarded: the ram backend zeroes it
        head -c $((3 * MiB)) /dev/urandom > /tmp/dpat
        deadline 60 dd if=/tmp/dpat of="/dev/$d" bs=$MiB seek=20 oflag=direct conv=fsync status=none ||
            die "writing the discard pattern"
        deadline 60 blkdiscard -o $((21 * MiB)) -l $MiB "/dev/$d" || die "blkdiscard on $d"
        deadline 60 dd if="/dev/$d" of=/tmp/dback bs=$MiB skip=20 count=3 iflag=direct status=none ||
            die "reading the discarded range"
        cmp -n $MiB /tmp/dpat /tmp/dback || die "discard changed the MiB before its range"
        cmp -n $MiB -i $((2 * MiB)):$((2 * MiB)) /tmp/dpat /tmp/dback || die "discard changed the MiB after its range"
        head -c $MiB /dev/zero | cmp -n $MiB -i 0:$MiB - /tmp/dback ||
            die "a discarded range of the ram backend does not read back as zeros"
        say "$d: discard of 1 MiB reads back as zeros, its neighbours intact"
    else
        [ "$dmax" = 0 ] || die "no VIRTIO_BLK_F_DISCARD, yet discard_max_bytes is $dmax"
        say "$d: the device offers no discard"
    fi
    if jq -e '.dev[0].features | index("VIRTIO_BLK_F_WRITE_ZEROES") != null' /tmp/show-uv0.json > /dev/null; then
        [ "$wzmax" -gt 0 ] || die "VIRTIO_BLK_F_WRITE_ZEROES negotiated but write_zeroes_max_bytes is 0"
    else
        [ "$wzmax" = 0 ] || die "no VIRTIO_BLK_F_WRITE_ZEROES, yet write_zeroes_max_bytes is $wzmax"
    fi
    vstats uv0 0 > /tmp/vs-before-wz || die "vstats uv0"
    head -c $((3 * MiB)) /dev/urandom > /tmp/zpat
    deadline 60 dd if=/tmp/zpat of="/dev/$d" bs=$MiB seek=24 oflag=direct conv=fsync status=none ||
        die "writing the write-zeroes pattern"
    deadline 60 blkdiscard -z -o $((25 * MiB)) -l $MiB "/dev/$d" || die "blkdiscard -z on $d"
    deadline 60 dd if="/dev/$d" of=/tmp/zback bs=$MiB skip=24 count=3 iflag=direct status=none ||
        die "reading the zeroed range"
    cmp -n $MiB /tmp/zpat /tmp/zback || die "write-zeroes changed the MiB before its range"
    cmp -n $MiB -i $((2 * MiB)):$((2 * MiB)) /tmp/zpat /tmp/zback || die "write-zeroes changed the MiB after its range"
    head -c $MiB /dev/zero | cmp -n $MiB -i 0:$MiB - /tmp/zback || die "blkdiscard -z: the range does not read back as zeros"
    say "$d: blkdiscard -z (write_zeroes_max_bytes $wzmax) reads back as zeros, its neighbours intact"

    # a file system: files, sync, umount, fsck clean, remount (caches dropped), checksums
    deadline 120 mkfs.ext4 -q -F "/dev/$d" || die "mkfs.ext4 on $d"
    mkdir -p /tmp/mnt
    deadline 30 mount -t ext4 "/dev/$d" /tmp/mnt || die "mounting $d"
    mkdir -p /tmp/mnt/dir
    head -c $((5 * MiB)) /dev/urandom > /tmp/mnt/big || die "writing /tmp/mnt/big"
    head -c 200000 /dev/urandom > /tmp/mnt/mid || die "writing /tmp/mnt/mid"
    i=0
    while [ $i -lt 40 ]; do
        head -c $((i * 97 + 1)) /dev/urandom > "/tmp/mnt/dir/f$i" || die "writing dir/f$i"
        i=$((i + 1))
    done
    (cd /tmp/mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums
    deadline 60 sync || die "sync"
    deadline 60 umount /tmp/mnt || die "umount"
    deadline 120 e2fsck -fn "/dev/$d" > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out >&2; die "e2fsck -fn on $d is not clean"; }
    echo 3 > /proc/sys/vm/drop_caches
    deadline 30 mount -t ext4 "/dev/$d" /tmp/mnt || die "remounting $d"
    (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums) || die "checksums differ after the remount"
    [ "$(wc -l < /tmp/sums)" = 42 ] || die "not 42 files on the file system"
    deadline 60 umount /tmp/mnt || die "umount after the checksums"
    say "$d: ext4: 42 files, e2fsck -fn clean, checksums match after remount"

    vs="$(vstats uv0 0)" || die "vstats uv0 qidx 0"
    say "uv0 qidx 0: $vs"
    jcheck /tmp/vstats-uv0-0.json \
        '.vstats | .requests > 0 and .bytes_read > 0 and .bytes_written > 0 and .calls > 0 and .errors == 0' \
        "uv0 qidx 0 counters: requests, bytes read and written, calls must be nonzero, errors 0"
    jq -e --slurpfile b /tmp/vs-before-wz \
        '.vstats.requests > $b[0].requests and .vstats.bytes_read > $b[0].bytes_read' \
        /tmp/vstats-uv0-0.json > /dev/null || die "uv0 counters did not grow between two samples"
}

case_file_2q() {
    d="$(wait_disk uvf 30)" || die "uvf gave no disk"
    show uvf || die "dev show uvf"
    jcheck /tmp/show-uvf.json '.dev[0] | .backend == "file" and .queues == 2 and .transport == "vduse"' \
        "dev show uvf: not a 2-queue file device over vduse"
    jcheck /tmp/show-uvf.json ".dev[0].kernel_dev == \"$d\"" "dev show uvf: kernel_dev is not $d"
    nq="$(ls /sys/block/"$d"/mq | wc -l)"
    [ "$nq" = 2 ] || die "/sys/block/$d/mq has $nq entries, not 2: $(ls /sys/block/"$d"/mq)"
    say "uvf is $d with 2 hardware queues"

    odirect_verify "$d" "$FILE_IMG"
    fio_verify "$d" 2
    # what fio wrote is in the image: the first 32 MiB read through the disk equal the file
    deadline 60 dd if="/dev/$d" of=/tmp/fback bs=$MiB count=32 iflag=direct status=none || die "reading $d"
    cmp -n $((32 * MiB)) /tmp/fback "$FILE_IMG" || die "$FILE_IMG differs from what $d reads"
    for q in 0 1; do
        vs="$(vstats uvf $q)" || die "vstats uvf qidx $q"
        say "uvf qidx $q: $vs"
        jcheck "/tmp/vstats-uvf-$q.json" '.vstats | .requests > 0 and .bytes_read > 0 and .errors == 0' \
            "uvf queue $q was not used (fio ran one job on each CPU) or has errors"
    done
}

case_split_ring() {
    d="$(wait_disk uvs 30)" || die "uvs gave no disk"
    show uvs > /dev/null || die "dev show uvs"
    jcheck /tmp/show-uvs.json '.dev[0].features | index("VIRTIO_F_VERSION_1") != null' \
        "dev show uvs: no VIRTIO_F_VERSION_1 among the negotiated features"
    jcheck /tmp/show-uvs.json '.dev[0].features | index("VIRTIO_F_RING_PACKED") == null' \
        "uvs does not offer packed rings, yet dev show lists VIRTIO_F_RING_PACKED"
    [ "$(feature_bit uvs 34)" = 0 ] || die "the guest's driver negotiated packed rings on uvs"
    say "uvs is $d, split rings: $(jq -c .dev[0].features /tmp/show-uvs.json)"
    odirect_verify "$d"
    fio_verify "$d" 1
}

case_read_only() {
    d="$(wait_disk uvro 30)" || die "uvro gave no disk"
    show uvro > /dev/null || die "dev show uvro"
    jcheck /tmp/show-uvro.json '.dev[0].read_only == true' "dev show uvro: not read_only"
    jcheck /tmp/show-uvro.json '.dev[0].features | index("VIRTIO_BLK_F_RO") != null' \
        "uvro: VIRTIO_BLK_F_RO not negotiated"
    [ "$(cat /sys/block/"$d"/ro)" = 1 ] || die "/sys/block/$d/ro is $(cat /sys/block/"$d"/ro), not 1"
    deadline 30 dd if=/dev/urandom of="/dev/$d" bs=4096 count=1 oflag=direct status=none 2> /tmp/ro.err
    rc=$?
    [ "$rc" != 124 ] || die "a write to the read-only $d hung"
    [ "$rc" != 0 ] || die "a write to the read-only $d succeeded"
    say "$d: the write failed (status $rc): $(cat /tmp/ro.err)"
    deadline 30 dd if=/dev/urandom of="/dev/$d" bs=4096 count=1 status=none 2> /dev/null
    rc=$?
    [ "$rc" != 124 ] || die "a buffered write to the read-only $d hung"
    [ "$rc" != 0 ] || die "a buffered write to the read-only $d succeeded"
    deadline 60 dd if="/dev/$d" of=/tmp/roback bs=65536 count=256 iflag=direct status=none ||
        die "O_DIRECT read of the read-only $d"
    cmp /tmp/roback "$RO_IMG" || die "$d reads other bytes than its image holds"
    say "$d: ro=1, writes fail, 16 MiB O_DIRECT read equals the image"
}

case_runtime_add_del() {
    uv dev add name uvadd mgmtdev blk backend ram size 16M transport vduse || die "dev add uvadd"
    d="$(wait_disk uvadd 30)" || die "uvadd gave no disk"
    [ -e /sys/block/"$d" ] || die "no /sys/block/$d"
    [ -c /dev/vduse/uvadd ] || die "no /dev/vduse/uvadd"
    show uvadd > /dev/null || die "dev show uvadd"
    jcheck /tmp/show-uvadd.json ".dev[0] | .transport == \"vduse\" and .kernel_dev == \"$d\"" \
        "dev show uvadd: not vduse, or kernel_dev is not $d"
    head -c $MiB /dev/urandom > /tmp/apat
    deadline 60 dd if=/tmp/apat of="/dev/$d" bs=65536 oflag=direct conv=fsync status=none || die "writing $d"
    deadline 60 dd if="/dev/$d" of=/tmp/aback bs=65536 count=16 iflag=direct status=none || die "reading $d"
    cmp /tmp/apat /tmp/aback || die "$d read back other bytes than written"
    say "uvadd added at run time is $d and works"
    deadline 60 "$BIN" --ctl "$CTL" dev del uvadd || die "dev del uvadd"
    end=$(($(date +%s) + 20))
    while [ -e /sys/block/"$d" ] || [ -e /dev/vduse/uvadd ] || [ -e /sys/bus/vdpa/devices/uvadd ]; do
        [ "$(date +%s)" -lt "$end" ] ||
            die "after dev del: /sys/block/$d $(test -e /sys/block/"$d" && echo stays || echo gone), /dev/vduse/uvadd $(test -e /dev/vduse/uvadd && echo stays || echo gone), vdpa device $(test -e /sys/bus/vdpa/devices/uvadd && echo stays || echo gone)"
        sleep 0.2
    done
    if uv dev show uvadd > /dev/null 2>&1; then die "dev show uvadd still finds it"; fi
    # the devices of the config file keep working
    for n in uv0 uvf uvs uvro; do
        o="$(disk_of $n)" || continue
        deadline 30 dd if="/dev/$o" of=/dev/null bs=65536 count=16 iflag=direct status=none ||
            die "$n ($o) no longer reads after uvadd was deleted"
    done
    say "dev del uvadd: $d, /dev/vduse/uvadd and the vDPA device are gone; the others still read"
}

# --- the config, the daemon, the cases -------------------------------------------------

: > "$CFG"
dev() { printf '[[device]]\nname = "%s"\ntransport = "vduse"\n%s\n\n' "$1" "$2" >> "$CFG"; }
for c in $CASES; do
    case "$c" in
        ram_packed) dev uv0 'mgmtdev = "blk"
backend = "ram"
size = "64M"
unoffer = []' ;;
        file_2q)
            truncate -s 64M "$FILE_IMG" || die "creating $FILE_IMG"
            dev uvf "mgmtdev = \"blk\"
backend = \"file\"
path = \"$FILE_IMG\"
queues = 2" ;;
        split_ring) dev uvs 'mgmtdev = "blk"
backend = "ram"
size = "64M"
unoffer = ["VIRTIO_F_RING_PACKED"]' ;;
        read_only)
            head -c $((16 * MiB)) /dev/urandom > "$RO_IMG" || die "creating $RO_IMG"
            dev uvro "mgmtdev = \"blk\"
backend = \"file\"
path = \"$RO_IMG\"
read_only = true" ;;
        runtime_add_del) ;;
        *) die "unknown case $c" ;;
    esac
done
cp "$CFG" "$OUT/" 2> /dev/null
say "config:"; cat "$CFG" >&2

mkdir -p "$RUN"
UVDPA_LOG=debug "$BIN" daemon --run-dir "$RUN" --config "$CFG" > "$OUT/uvdpa-blk-daemon.out" 2> "$LOG" &
DPID=$!
wait_path "$CTL" 30 "$DPID" || { tail -n 50 "$LOG" >&2; die "the daemon made no control socket"; }
say "daemon $DPID up"

FAILED=""
for c in $CASES; do
    say "=== case $c"
    t0=$(date +%s)
    if (case_"$c"); then
        echo "UVDPA-CASE: $c PASS ($(($(date +%s) - t0)) s)"
    else
        echo "UVDPA-CASE: $c FAIL ($(($(date +%s) - t0)) s)"
        FAILED="$FAILED $c"
        say "daemon log tail:"; tail -n 40 "$LOG" >&2
    fi
done

say "=== case shutdown"
disks=""
for n in uv0 uvf uvs uvro; do disks="$disks $(disk_of $n)"; done
kill -TERM "$DPID"
end=$(($(date +%s) + 45))
while kill -0 "$DPID" 2> /dev/null && [ "$(awk '{ print $3 }' /proc/"$DPID"/stat 2> /dev/null)" != Z ]; do
    [ "$(date +%s)" -lt "$end" ] || break
    sleep 0.2
done
if kill -0 "$DPID" 2> /dev/null && [ "$(awk '{ print $3 }' /proc/"$DPID"/stat 2> /dev/null)" != Z ]; then
    say "the daemon did not exit within 45 s of SIGTERM"; rc=timeout
    kill -9 "$DPID" 2> /dev/null
else
    wait "$DPID"; rc=$?
fi
left=""
for d in $disks; do [ ! -e /sys/block/"$d" ] || left="$left /sys/block/$d"; done
for n in uv0 uvf uvs uvro; do [ ! -e /dev/vduse/"$n" ] || left="$left /dev/vduse/$n"; done
if [ "$rc" = 0 ] && [ -z "$left" ]; then
    echo "UVDPA-CASE: shutdown PASS"
else
    echo "UVDPA-CASE: shutdown FAIL (exit $rc; left:${left:- nothing})"
    FAILED="$FAILED shutdown"
    tail -n 40 "$LOG" >&2
fi

[ -z "$FAILED" ] || die "failed cases:$FAILED"
say "all cases passed: $CASES shutdown"
