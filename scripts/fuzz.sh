#!/usr/bin/env bash
# Smoke-fuzz every target in fuzz/ for SECONDS each (default 30): builds them with cargo-fuzz
# (installed first if missing), runs each from its seeds and past crashes (fuzz/seeds/TARGET,
# fuzz/regressions/TARGET, both read-only) and its growing corpus (fuzz/corpus/TARGET), and
# exits non-zero if any target crashed, panicked, hung or leaked, printing the reproducer's
# path.
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="split_chain blk_request" scripts/fuzz.sh 60
#   UVDPA_FUZZ_HIDE_KNOWN=1 scripts/fuzz.sh   # vhost_user_stream steers around known bugs
#
# Reproduce a crash:  RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# Minimize it:        RUSTC_BOOTSTRAP=1 cargo fuzz tmin TARGET fuzz/artifacts/TARGET/crash-...
# cargo-fuzz needs nightly-only flags (-Z sanitizer); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-30}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]  (a positive number of seconds per target)" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1
NICE=(nice -n "${FUZZ_NICE:-10}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
echo "== $(cargo fuzz --version)"

TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list)}"
echo "== building: $(echo $TARGETS)"
"${NICE[@]}" cargo fuzz build

failed=()
for t in $TARGETS; do
    corpus="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do
        [ -d "$d" ] && seeds+=("$d")
    done
    log="$artifacts/fuzz.log"
    echo "== $t: ${SECONDS_PER_TARGET}s (log: $log)"
    marker="$(mktemp)"
    status=0
    "${NICE[@]}" cargo fuzz run "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=60 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" \
        | sed 's/^/   /' || true
    if [ "$status" -ne 0 ]; then
        echo "!! $t FAILED (exit $status)"
        grep -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)|^SUMMARY' "$log" | head -5 | sed 's/^/   /' || true
        found=0
        while IFS= read -r a; do
            echo "   reproducer: $a"
            found=1
        done < <(find "$artifacts" -maxdepth 1 -type f -newer "$marker" ! -name fuzz.log)
        [ "$found" -eq 1 ] || echo "   (no artifact written; see $log)"
        failed+=("$t")
    fi
    rm -f "$marker"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all fuzz targets ran ${SECONDS_PER_TARGET}s without a crash"
