#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests against real etcd clusters that the
# harness starts and stops itself, and the benchmarks once each in test mode (so they do not rot).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets
