#!/usr/bin/env bash
# Flood benchmark: the latency a bystander device keeps while another device of the same
# daemon is flooded by a hostile frontend (issue 12, per-device resource limits).
#
# Runs the `floods_leave_a_bystander_serving` test of crates/daemon/tests/flood.rs built
# in release: a libblkio client does QD1 4 KiB write + read-verify on device `by` (ram)
# throughout, while a hostile frontend floods device `fl` phase after phase (quiet,
# connect churn, 1 TiB memory-table churn, a kick flood, a ring-break storm, absurd ring
# sizes), SECS seconds each. The test prints each phase's p50/p99 (every request's
# latency) and the p99 ratio to the quiet phase; this script repeats it REPS times and
# reports each phase's median p50/p99 over the reps and the ratio of the median p99 to
# the quiet one. The target is a ratio <= 2 in every phase. Nothing is pinned: the
# daemon, the bystander and the flooder share the machine's CPUs, as they would.
# Output: a Markdown report on stdout, also written to benches/results/flood-<date>.md.
#
# Environment knobs (defaults in brackets):
#   SECS [10]       seconds per phase
#   REPS [3]        repetitions of the whole run
#   SKIP_BUILD [0]  set to 1 to use the test binary already built in target/release
#   RESULTS_DIR [benches/results]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${SECS:-10}
REPS=${REPS:-3}
SKIP_BUILD=${SKIP_BUILD:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benches/results}
CMDLINE="SECS=$SECS REPS=$REPS benches/flood.sh"

log() { printf '[flood.sh] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
[[ $SECS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "SECS must be a number, got '$SECS'"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer, got '$REPS'"

cd "$ROOT"
build_out=$(mktemp)
trap 'rm -f "$build_out" "${RAW:-}"' EXIT
if [[ $SKIP_BUILD == 1 ]]; then
    cargo test --release --locked -p uvdpa-daemon --test flood --no-run --offline >"$build_out" 2>&1 ||
        die "no release build of the flood test (run without SKIP_BUILD=1)"
else
    log "building the flood test and the daemon (release)"
    cargo test --release --locked -p uvdpa-daemon --test flood --no-run >"$build_out" 2>&1 ||
        { cat "$build_out" >&2; die "build failed"; }
fi
BIN=$(grep -o 'target/release/deps/flood-[0-9a-f]*' "$build_out" | tail -1)
[[ -x $BIN ]] || die "flood test binary not found in the cargo output"

RAW=$(mktemp)
for rep in $(seq 1 "$REPS"); do
    log "rep $rep/$REPS: 6 phases of ${SECS}s"
    UVDPA_FLOOD_SECS=$SECS "$BIN" floods_leave_a_bystander_serving --exact --nocapture \
        --test-threads 1 2>&1 | sed -n "s/^FLOOD /rep=$rep /p; s/^phase /rep=$rep phase /p" >>"$RAW" ||
        die "the flood test failed in rep $rep"
    grep -q "^rep=$rep quiet" "$RAW" || die "rep $rep printed no FLOOD lines"
done

# median of the numbers on stdin
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
field() { # field PHASE KEY -> the KEY= values of PHASE's lines
    awk -v p="$2" -v k="$3" '$2==p {for (i=3;i<=NF;i++) {split($i,a,"="); if (a[1]==k) print a[2]}}' "$1"
}

mkdir -p "$RESULTS_DIR"
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT="$RESULTS_DIR/flood-$STAMP.md"
REV=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo " (dirty tree)")
QUIET_P99=$(field "$RAW" quiet p99_us | median)
{
    echo "# uvdpa flood benchmark, $STAMP"
    echo
    echo "- command: \`$CMDLINE\`"
    echo "- what: \`crates/daemon/tests/flood.rs\` \`floods_leave_a_bystander_serving\` (release), $SECS s per phase, $REPS reps;"
    echo "  bystander: libblkio QD1 4 KiB write + read-verify on a ram device, every request's latency;"
    echo "  flooder on another device of the same daemon, one phase at a time; nothing pinned"
    echo "- uvdpa: $REV; kernel: \`$(uname -r)\`; CPUs: $(nproc); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- p50/p99: median over reps of each rep's percentile; ratio: median p99 / median quiet p99 (target <= 2)"
    echo
    echo "| phase | requests (median) | p50 µs | p99 µs | p99 / quiet p99 |"
    echo "|---|---:|---:|---:|---:|"
    for phase in quiet connect-churn mem-table-churn kick-flood ring-break-storm absurd-ring-sizes; do
        ops=$(field "$RAW" "$phase" ops | median)
        p50=$(field "$RAW" "$phase" p50_us | median)
        p99=$(field "$RAW" "$phase" p99_us | median)
        ratio=$(awk -v a="$p99" -v b="$QUIET_P99" 'BEGIN {printf "%.2f", a/b}')
        printf '| %s | %.0f | %.1f | %.1f | %sx |\n' "$phase" "$ops" "$p50" "$p99" "$ratio"
    done
    echo
    echo "What each flood did to its own device (sessions accepted, log lines):"
    echo
    echo '```'
    grep ' phase ' "$RAW"
    echo '```'
    echo
    echo "Raw per-rep lines:"
    echo
    echo '```'
    grep -v ' phase ' "$RAW"
    echo '```'
} | tee "$OUT"
log "report written to $OUT"
