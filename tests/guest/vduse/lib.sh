# Guest-side helpers for scripts run by run.sh (POSIX sh: the host's dash runs them).
#     . "$UVDPA_LIB"
#
# load_modules NAME...          insmod NAME and its modules.dep dependencies (deps first),
#                               skipping loaded and built-in ones; module parameters:
#                               load_modules "null_blk nr_devices=1"
# load_vduse_modules [blk|net|all]
#                               vhost_iotlb vdpa vduse virtio_vdpa + virtio_blk (blk, the
#                               default) and/or failover net_failover virtio_net (net)
# wait_blockdev NAME SECS       wait until /sys/block/NAME and the node /dev/NAME exist
# wait_path PATH SECS [PID]     wait until PATH exists (fail early if process PID exits)
# deadline SECS CMD...          run CMD in the background with a wall-clock deadline; its
#                               status, or 124 (and a message) if the deadline passed. The
#                               command is SIGKILLed then but may stay in D state (a dead
#                               VDUSE daemon): deadline does not wait for it
# vdpa_add NAME [MGMTDEV]       vdpa dev add name NAME mgmtdev MGMTDEV (default vduse), 30 s
# vdpa_del NAME [SECS]          vdpa dev del NAME with a deadline (default 40 s: the kernel
#                               waits 30 s for a daemon that does not answer)
# first_virtio_disk             the name (e.g. vda) of the first vd* disk in /sys/block
# say MSG...                    "uvdpa-guest: MSG" with the uptime, on stderr
# die MSG...                    say MSG, exit 1

say() { echo "uvdpa-guest: [$(cut -d' ' -f1 /proc/uptime)] $*" >&2; }
die() { say "FAIL: $*"; exit 1; }

# _moddep NAME: the modules.dep line of NAME ("path: dep dep"), empty if none
_moddep() {
    grep -m 1 -E "/$(echo "$1" | sed 's/[-_]/[-_]/g')\.ko:" "$UVDPA_MODDEC/modules.dep"
}

# _insmod_one NAME [PARAMS...]: insmod one module (no dependencies)
_insmod_one() {
    _m="$1"; shift
    [ ! -d "/sys/module/$_m" ] || return 0
    _line="$(_moddep "$_m")"
    if [ -z "$_line" ]; then
        grep -qE "/$(echo "$_m" | sed 's/_/[-_]/g')\.ko\$" "$UVDPA_MODDEC/modules.builtin" && return 0
        say "module $_m not found in $UVDPA_MODDEC/modules.dep"; return 1
    fi
    _rel="${_line%%:*}"
    _ko="$UVDPA_MODDEC/$_rel"
    if [ ! -r "$_ko" ]; then
        # not decompressed by fetch-kernel.sh: decompress it into the guest's /tmp
        mkdir -p /tmp/uvdpa-modules
        _src="$(ls "$UVDPA_MODDIR/$_rel".* 2> /dev/null | head -n 1)"
        [ -n "$_src" ] || { say "no $UVDPA_MODDIR/$_rel.*"; return 1; }
        _ko="/tmp/uvdpa-modules/${_rel##*/}"
        case "$_src" in
            *.xz) xz -dc "$_src" > "$_ko" ;;
            *.zst) zstd -qdc "$_src" > "$_ko" ;;
            *.gz) gzip -dc "$_src" > "$_ko" ;;
        esac || { say "decompressing $_src failed"; return 1; }
    fi
    /bin/busybox insmod "$_ko" "$@" || { [ -d "/sys/module/$_m" ] || { say "insmod $_ko failed"; return 1; }; }
}

# _load_rec NAME: dependencies first, then NAME (with params only for the named module)
_load_rec() {
    _n="$(echo "$1" | tr - _)"; shift
    [ ! -d "/sys/module/$_n" ] || return 0
    for _d in $(_moddep "$_n" | cut -d: -f2-); do
        _d="${_d##*/}"; _d="${_d%%.ko*}"
        (_load_rec "$_d") || return 1   # a subshell: sh has no local variables
    done
    _insmod_one "$_n" "$@"
}

load_modules() {
    for _spec in "$@"; do
        # "name param=value ..." -> name + params
        # shellcheck disable=SC2086
        set -f; _load_rec $_spec || { set +f; return 1; }; set +f
    done
}

load_vduse_modules() {
    case "${1:-blk}" in
        blk) load_modules vhost_iotlb vdpa vduse virtio_vdpa virtio_blk ;;
        net) load_modules vhost_iotlb vdpa vduse virtio_vdpa failover net_failover virtio_net ;;
        all) load_modules vhost_iotlb vdpa vduse virtio_vdpa virtio_blk failover net_failover virtio_net ;;
        *) say "load_vduse_modules: blk, net or all"; return 1 ;;
    esac || return 1
    [ -c /dev/vduse/control ] || wait_path /dev/vduse/control 5
}

_now() { date +%s; }

wait_path() {
    _end=$(($(_now) + $2))
    while [ ! -e "$1" ]; do
        [ "$(_now)" -lt "$_end" ] || { say "$1 did not appear within $2 s"; return 1; }
        [ -z "${3:-}" ] || kill -0 "$3" 2> /dev/null || { say "process $3 exited before $1 appeared"; return 1; }
        sleep 0.1
    done
}

wait_blockdev() {
    _end=$(($(_now) + $2))
    while [ ! -e "/sys/block/$1" ] || [ ! -b "/dev/$1" ]; do
        [ "$(_now)" -lt "$_end" ] || { say "block device $1 did not appear within $2 s"; return 1; }
        sleep 0.1
    done
}

first_virtio_disk() {
    for _b in /sys/block/vd*; do
        [ -e "$_b" ] && { echo "${_b##*/}"; return 0; }
    done
    return 1
}

deadline() {
    _secs="$1"; shift
    "$@" &
    _pid=$!
    _end=$(($(_now) + _secs))
    while kill -0 "$_pid" 2> /dev/null; do
        # a zombie counts as done: reap it below
        [ "$(awk '{ print $3 }' "/proc/$_pid/stat" 2> /dev/null)" != Z ] || break
        if [ "$(_now)" -ge "$_end" ]; then
            say "deadline: '$*' still running after $_secs s (state $(awk '{ print $3 }' "/proc/$_pid/stat" 2> /dev/null)); killing it"
            kill -9 "$_pid" 2> /dev/null
            return 124
        fi
        sleep 0.1
    done
    wait "$_pid"
}

vdpa_add() {
    deadline 30 vdpa dev add name "$1" mgmtdev "${2:-vduse}"
}

vdpa_del() {
    deadline "${2:-40}" vdpa dev del "$1"
}
