#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests against real etcd clusters that the
# harness starts and stops itself, and the benchmarks once each at tiny size (so they do not rot).
# Ends with one summary line of all the test binaries' counts, then the chaos suite's figures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
figures=target/tmp/chaos-figures.txt
rm -f "$figures"
cargo test --all-targets 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
# The chaos suite's figures (faults, reads and events checked, violations, convergence).
if [ -f "$figures" ]; then cat "$figures"; fi
