#!/usr/bin/env bash
# Builds the release binary as fleets run it: glibc linked statically (a static PIE), and prints
# the binary's path. The image (docker/Dockerfile), release artifacts and the fleet benchmark use
# it; a plain `cargo build --release` stays an ordinary dynamic binary in target/release/.
#
# Why static: dynamically linked, every sidecar maps libc, libm, libgcc_s and the loader, and
# fault-around makes ~2.3 MiB of them resident in each one; linked in, only the functions used come
# along: 1.4 MiB less RSS per idle sidecar (benches/fleet/). Host names still resolve through
# glibc's NSS modules, loaded at run time from the same glibc release (Debian 12's 2.36 in both
# the build and the runtime image).
#
# Why --target: with a target named, RUSTFLAGS reach only what runs on the target, not build
# scripts and proc-macros, which must stay dynamic. The binary so lands in
# target/<host-tuple>/release/, apart from the dynamic one.
#
#   scripts/build-static.sh [cargo build flags...]    # e.g. --locked
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc --print host-tuple)
case "$host" in
*-linux-gnu*) static="-C target-feature=+crt-static" ;;
*) static="" ;; # musl links statically by default; elsewhere there is no glibc to link in
esac
RUSTFLAGS="${RUSTFLAGS:-} $static" cargo build --release --bin config-sidecar --target "$host" "$@" >&2
echo "$PWD/target/$host/release/config-sidecar"
