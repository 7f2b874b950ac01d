#!/usr/bin/env bash
# The whole test suite: unit and property tests, libblkio end-to-end tests, malformed
# vhost-user input, the management plane, a malicious guest, a soak, and a real Linux guest
# under QEMU. Installs missing Debian packages first. Ends with one summary line over every
# test binary ("N passed, N failed").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
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
