#!/usr/bin/env bash
# Fuzzes the key/path parser, the wire screen of request heads and the snapshot decoder with cargo-fuzz (libFuzzer), then
# minimises each corpus in place so what is committed stays small. The stable toolchain is
# enough: RUSTC_BOOTSTRAP lets cargo-fuzz use the sanitizer flags it needs.
#   scripts/fuzz.sh [seconds per target, default 60]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in key_path request_stream snapshot_decode; do
    cargo fuzz run "$target" -- -max_total_time="$seconds" -max_len=4096
    cargo fuzz cmin "$target"
done
