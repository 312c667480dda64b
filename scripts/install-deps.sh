#!/usr/bin/env bash
# Installs, from Debian's packages, what building and testing config-sidecar needs when it is
# missing: etcd (the server the tests run), etcdctl (used to seed the local demo), protoc
# (etcd-client's build needs it), and nginx and wrk (the load benchmark's reference server and
# load generator; its smoke run is part of the test suite). Extra package names given as
# arguments are installed too.
set -euo pipefail

declare -A want=([etcd]=etcd-server [etcdctl]=etcd-client [protoc]=protobuf-compiler [nginx]=nginx-light [wrk]=wrk)
need=()
for cmd in etcd etcdctl protoc nginx wrk; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("${want[$cmd]}")
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
# Debian starts nginx's own service on install; the benchmark runs its own instance.
if printf '%s\n' "${need[@]}" | grep -qx nginx-light; then
  $sudo service nginx stop >/dev/null 2>&1 || true
fi
