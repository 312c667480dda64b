#!/usr/bin/env bash
# The used-by story in real containers (issue 29; podman as root, Debian's packages, no image
# registry). The images: the sidecar's from scripts/build-image.sh, etcd's from Debian's etcd, the
# app's from busybox and Debian's curl (containers/lib.sh). Then:
# 1. containers/drill.sh: a stack like docker/compose.yml in one pod: three etcd members, the
#    sidecar with its snapshot volume, an app reading over localhost and from the file the
#    sidecar renders into a shared volume. The outage drill, each mode change timed: one member
#    paused (frozen) → still full, and a change reaches the app; two members stopped → read-only;
#    the third stopped → cache-only; the sidecar container restarted during the outage → serves
#    its snapshot from its volume, as its non-root user; members started, a change made at once
#    → full, and the change reaches the app over HTTP and in the file; `podman stop` → exit 0.
# 2. containers/compose.sh: docker/compose.yml itself by podman-compose: service names resolved,
#    the app reading over localhost and the rendered file, a change reaching it, exit 0 on stop,
#    `down`.
# 3. containers/kube.sh: docker/k8s/deployment.yaml by `podman kube play`, against three etcd
#    containers with TLS, client certificates and auth: both replicas ready, probes passing, the
#    apps reading, a change reaching them, exit 0 on SIGTERM, `podman kube down`.
# Every container, pod, volume, network, secret and tag made is removed at the end, also when a
# step fails.
#
#   scripts/container-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
source scripts/containers/lib.sh
source scripts/containers/drill.sh
source scripts/containers/compose.sh
source scripts/containers/kube.sh
echo "container-test.sh: passed in $(($(date +%s) - started)) s"
