#!/usr/bin/env bash
# The whole test suite: unit and property tests, libblkio end-to-end tests, malformed
# vhost-user input, and a real Linux guest under QEMU. Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace --locked "$@"
