#!/usr/bin/env bash
# The whole test suite: unit and property tests, and integration tests that
# start a SeaweedFS server on 127.0.0.1 and mount bucketfs through real FUSE.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/weed-path.sh
cargo test --locked --no-fail-fast "$@"
# Model checking of the writer registry and the budget: the `shuttle` feature
# puts the core's mutexes on shuttle's, so only these tests run with it.
[ "$#" -gt 0 ] || cargo test --locked --features shuttle --lib shuttle
[ "$#" -gt 0 ] || scripts/container-e2e.sh  # the FUSE image in containers, run as Fluid runs it
