#!/usr/bin/env bash
# Installs, from Debian's packages, what building and testing config-sidecar needs when it is
# missing: etcd (the server the tests run), etcdctl (used to seed the local demo) and protoc
# (etcd-client's build needs it). Extra package names given as arguments are installed too
# (the load benchmark passes nginx-light and wrk).
set -euo pipefail

declare -A want=([etcd]=etcd-server [etcdctl]=etcd-client [protoc]=protobuf-compiler [nginx]=nginx-light [wrk]=wrk)
need=()
for cmd in etcd etcdctl protoc; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${want[$cmd]}")
done
for pkg in "$@"; do
  cmd=""
  for c in "${!want[@]}"; do [ "${want[$c]}" = "$pkg" ] && cmd=$c; done
  if [ -z "$cmd" ] || ! command -v "$cmd" >/dev/null 2>&1; then need+=("$pkg"); fi
done
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${need[*]}" >&2
# A fresh machine has no package lists: update once first.
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
