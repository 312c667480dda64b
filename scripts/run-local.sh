#!/usr/bin/env bash
# Starts a local 3-member etcd cluster on loopback, seeds example configuration under
# /config/demo/, and runs the sidecar against it on 127.0.0.1:7379. Ctrl-C stops everything.
#
#   scripts/run-local.sh            # then, in another shell: curl localhost:7379/v1/tree/config/demo
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

workdir=$(mktemp -d "${TMPDIR:-/tmp}/config-sidecar-local.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT INT TERM

cluster=""
for i in 1 2 3; do cluster+="${cluster:+,}m$i=http://127.0.0.1:${i}2380"; done
endpoints=""
for i in 1 2 3; do
  client="http://127.0.0.1:${i}2379"
  peer="http://127.0.0.1:${i}2380"
  endpoints+="${endpoints:+,}$client"
  etcd --name "m$i" --data-dir "$workdir/m$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new \
    --initial-cluster-token config-sidecar-local \
    --logger zap --log-level warn >"$workdir/m$i.log" 2>&1 &
  pids+=($!)
done
echo "etcd members on $endpoints (logs in $workdir)" >&2

for _ in $(seq 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --dial-timeout 1s put /config/demo/_ready yes >/dev/null 2>&1; then
    break
  fi
  sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$endpoints" del /config/demo/_ready >/dev/null
examples/seed.sh "$endpoints"

cargo build --release --quiet
CONFIG_SIDECAR_ENDPOINTS="$endpoints" ./target/release/config-sidecar --config examples/config.toml &
pids+=($!)
wait "${pids[-1]}"
