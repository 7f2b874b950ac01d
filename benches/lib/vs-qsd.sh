# Shared by the network-backend benchmarks (benches/rbd.sh, benches/nbd.sh): run uvdpa and
# qemu-storage-daemon one at a time against the same storage, the same libblkio client
# (uvdpa-blkbench, one queue) and the same workloads, alternating which goes first each
# rep, and print a Markdown table of median IOPS with the uvdpa/qsd ratio.
#
# The sourcing script sets ROOT, WORK, NAME (report file prefix), defines start_uvdpa and
# start_qsd (each calls `start NAME SOCK CMD...` and leaves the socket path in SOCK) and
# report_header (the report's bullet lines), then calls `vs_qsd_run`.
#
# Knobs (environment): RUNTIME [10] seconds per run, RAMP [1], REPS [3], WORKLOADS
# ["randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:1M:8 write:1M:8"],
# SKIP_BUILD [0], QSD [qemu-storage-daemon], RESULTS_DIR [benches/results].

RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
REPS=${REPS:-3}
WORKLOADS=${WORKLOADS:-"randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:1M:8 write:1M:8"}
SKIP_BUILD=${SKIP_BUILD:-0}
QSD=${QSD:-qemu-storage-daemon}
UVDPA=$ROOT/target/release/uvdpa
BENCH=$ROOT/target/release/uvdpa-blkbench
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benches/results}
SERVER_PID=""

log() { printf '[%s.sh] %s\n' "$NAME" "$*" >&2; }
die() {
    log "$*"
    exit 1
}

vs_qsd_build() {
    command -v "$QSD" >/dev/null || die "$QSD not found (scripts/install-deps.sh)"
    if [[ $SKIP_BUILD != 1 ]]; then
        log "building uvdpa and uvdpa-blkbench (release)"
        (cd "$ROOT" && cargo build --release -q -p uvdpa-daemon -p uvdpa-blkbench) || die "build failed"
    fi
}

start() { # start NAME SOCK CMD...: run a server until its socket exists
    local name=$1 sock=$2
    shift 2
    rm -f "$sock"
    "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        [[ -S $sock ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    sed 's/^/    /' "$WORK/$name.log" >&2
    die "$name did not start"
}

stop() { # SIGTERM, SIGKILL after 10 s (a server stuck on dead storage), reap
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID
    SERVER_PID=""
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Starts uvdpa with one blk device `bench0` (1 queue of 256) whose backend lines are $1
# (TOML), plus `poll_us` when UVDPA_POLL_US is set; leaves its socket in SOCK.
start_uvdpa_with() {
    mkdir -p "$WORK/uvdpa.run"
    cat >"$WORK/uvdpa.toml" <<EOT
[[device]]
name = "bench0"
mgmtdev = "blk"
$1
queues = 1
queue_size = 256
${UVDPA_POLL_US:+poll_us = $UVDPA_POLL_US}
EOT
    SOCK=$WORK/uvdpa.run/bench0.sock
    start uvdpa "$SOCK" "$UVDPA" daemon --run-dir "$WORK/uvdpa.run" --config "$WORK/uvdpa.toml"
}

# Writes the whole disk once through uvdpa (1 MiB sequential), so reads hit real data.
vs_qsd_prefill() {
    start_uvdpa
    log "prefilling the disk (sequential 1 MiB writes)"
    "$BENCH" --path "$SOCK" --rw fill --bs 1048576 --iodepth 8 >/dev/null || die "prefill failed"
    stop
}

median() { tr ' ' '\n' <<<"$*" | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

vs_qsd_run() {
    declare -A IOPS FAILS
    local rep target wl rw bs qd b out iops
    for ((rep = 1; rep <= REPS; rep++)); do
        for target in uvdpa qsd; do
            # Alternate which goes first, so drift hits both alike.
            ((rep % 2 == 0)) && target=$([[ $target == uvdpa ]] && echo qsd || echo uvdpa)
            "start_$target"
            for wl in $WORKLOADS; do
                IFS=: read -r rw bs qd <<<"$wl"
                case $bs in *k) b=$((${bs%k} * 1024)) ;; *M) b=$((${bs%M} * 1048576)) ;; *) b=$bs ;; esac
                if ! out=$("$BENCH" --path "$SOCK" --rw "$rw" --bs "$b" --iodepth "$qd" \
                    --runtime "$RUNTIME" --ramp "$RAMP" 2>"$WORK/client.err"); then
                    log "rep $rep $target $wl failed: $(cat "$WORK/client.err")"
                    FAILS[$target|$wl]+="rep$rep "
                    # A stuck server is restarted for the next workload.
                    stop
                    "start_$target"
                    continue
                fi
                iops=$(sed -n 's/.*"iops":\([0-9.e+]*\).*/\1/p' <<<"$out")
                log "rep $rep $target $wl: $iops IOPS"
                IOPS[$target|$wl]+="$iops "
            done
            stop
        done
    done

    local stamp out_file u q note t
    stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
    mkdir -p "$RESULTS_DIR"
    out_file=$RESULTS_DIR/$NAME-$stamp.md
    {
        echo "# uvdpa $NAME vs qemu-storage-daemon $NAME, $stamp"
        echo
        report_header
        echo "- client: uvdpa-blkbench (libblkio, 1 queue), ${RUNTIME}s per run after ${RAMP}s ramp, median of $REPS reps, servers alternating"
        echo "- versions: uvdpa $(git -C "$ROOT" rev-parse --short HEAD), $("$QSD" --version | head -n1)"
        echo "- machine: $(nproc) CPUs, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo
        echo "| workload | QD | uvdpa IOPS | qsd IOPS | uvdpa/qsd |"
        echo "|---|---:|---:|---:|---:|"
        for wl in $WORKLOADS; do
            IFS=: read -r rw bs qd <<<"$wl"
            u=$(median ${IOPS[uvdpa|$wl]:-0})
            q=$(median ${IOPS[qsd|$wl]:-0})
            note=""
            for t in uvdpa qsd; do
                [[ -n ${FAILS[$t|$wl]:-} ]] && note+=" ($t failed: ${FAILS[$t|$wl]% }; median of the other runs)"
            done
            awk -v rw="$rw" -v bs="$bs" -v qd="$qd" -v u="$u" -v q="$q" -v note="$note" \
                'BEGIN { printf "| %s %s | %s | %.0f | %.0f | %.2fx%s |\n", rw, bs, qd, u, q, (q > 0 ? u / q : 0), note }'
        done
    } | tee "$out_file"
    log "report written to $out_file"
}
