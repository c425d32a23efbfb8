#!/usr/bin/env bash
# The whole test suite: unit and property tests, and integration tests that
# start a SeaweedFS server on 127.0.0.1 and mount bucketfs through real FUSE.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/weed-path.sh
cargo test --locked --no-fail-fast "$@"
[ "$#" -gt 0 ] || scripts/container-e2e.sh  # the FUSE image in containers, run as Fluid runs it
