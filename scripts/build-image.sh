#!/usr/bin/env bash
# Builds the container image from docker/Dockerfile with podman (or docker, where that is what the
# machine has) and tags it localhost/config-sidecar:dev (IMAGE_TAG overrides); prints the image's
# size.
#
# Two ways, one Dockerfile:
# - default: no image registry needed. The binary is built here by scripts/build-static.sh and
#   staged into a small build context (the Dockerfile's `prebuilt` stage; its Rust build stage is
#   then skipped), and the runtime base is made here from this Debian machine's own files
#   (localhost/config-sidecar-base:dev: the users, CA certificates, nsswitch.conf, /tmp; the same
#   layout as the distroless base, with no shell either). This is what the tests run.
# - `--from-registries`: exactly what `docker build -f docker/Dockerfile .` does, pulling
#   rust:1-bookworm and gcr.io/distroless/cc-debian12:nonroot.
#
# The image keeps its HEALTHCHECK only in the docker image format, so podman builds with
# `--format docker`. Extra arguments go to the engine's `build`.
#
#   scripts/build-image.sh [--from-registries] [build flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${IMAGE_TAG:-localhost/config-sidecar:dev}
engine=$(command -v podman || command -v docker || true)
[ -n "$engine" ] || { echo "build-image.sh: neither podman nor docker is installed" >&2; exit 1; }
format=()
[ "$(basename "$engine")" = podman ] && format=(--format docker)

if [ "${1:-}" = --from-registries ]; then
  shift
  "$engine" build "${format[@]}" -f docker/Dockerfile -t "$tag" "$@" . >&2
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT

  # The runtime base: distroless's layout, from this machine's files.
  base=localhost/config-sidecar-base:dev
  mkdir -p "$work/base/etc/ssl/certs" "$work/base/tmp" "$work/base/home/nonroot"
  cat >"$work/base/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$work/base/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  echo "hosts: files dns" >"$work/base/etc/nsswitch.conf"
  certs=/etc/ssl/certs/ca-certificates.crt
  [ -s "$certs" ] || { echo "build-image.sh: $certs is missing (Debian's ca-certificates)" >&2; exit 1; }
  cp "$certs" "$work/base/etc/ssl/certs/"
  cat >"$work/base/Containerfile" <<'EOF'
FROM scratch
COPY --chown=0:0 etc /etc
COPY --chmod=1777 tmp /tmp
COPY --chown=65532:65532 home /home
EOF
  "$engine" build "${format[@]}" -t "$base" "$work/base" >&2

  # The binary, stripped (the release profile keeps debug info for profiling), and the empty
  # directory the snapshot volume is mounted on.
  mkdir -p "$work/context/state"
  cp "$(scripts/build-static.sh --locked)" "$work/context/config-sidecar"
  strip "$work/context/config-sidecar"
  "$engine" build "${format[@]}" -f docker/Dockerfile -t "$tag" \
    --build-arg BINARY_FROM=prebuilt --build-arg RUNTIME_BASE="$base" "$@" "$work/context" >&2
fi
size=$("$engine" image inspect "$tag" --format '{{.Size}}')
echo "$tag: $size bytes ($((size / 1024 / 1024)) MiB)"
