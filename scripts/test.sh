#!/usr/bin/env bash
# The whole test suite: unit and property tests, libblkio end-to-end tests, malformed
# vhost-user input, the management plane, a malicious guest, a soak, and a real Linux guest
# under QEMU. Installs missing Debian packages first.
#
# Runs under cargo-nextest (one process per test; a test that fails and then passes on its
# one retry is reported as FLAKY in the summary, never hidden) when it is installed, else
# under `cargo test`, closing with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if cargo nextest --version >/dev/null 2>&1; then
    cargo test --workspace --locked --doc "$@"
    exec cargo nextest run --workspace --locked --retries 1 "$@"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
echo
echo "$passed passed, $failed failed"
exit "$status"
