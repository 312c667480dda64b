# Sourced by scripts/container-test.sh (after containers/lib.sh): the compose-like stack and its
# outage drill. Three etcd members, the sidecar and an app in one pod (one network namespace, as
# in a Kubernetes pod; the members listen on loopback ports rather than as etcd1..3 of
# docker/compose.yml, because podman's DNS failed lookups for ~40 s after members restarted in
# some runs, see compose.sh); the app reads over localhost and from the file the sidecar renders
# into a volume both mount.

pod=config-sidecar-drill-$$
volume=$pod-snapshot
shared=$pod-shared
made_pods+=("$pod")
made_volumes+=("$volume" "$shared")

# The stack: one pod, three members on loopback ports, the sidecar with its snapshot volume.
quiet podman pod create --name "$pod" >/dev/null
cluster=m1=http://127.0.0.1:2380,m2=http://127.0.0.1:2390,m3=http://127.0.0.1:2400
start_member() {
  local client=$((2369 + $1 * 10)) peer=$((2370 + $1 * 10))
  quiet podman run -d --pod "$pod" --name "$pod-m$1" "$etcd_image" \
    --name "m$1" --data-dir /var/lib/etcd --initial-cluster "$cluster" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" >/dev/null
}
for m in 1 2 3; do start_member $m; done
etcdctl_in_pod() {
  quiet podman exec "$pod-m1" /usr/bin/etcdctl --endpoints http://127.0.0.1:2379 "$@"
}
for _ in $(seq 1 100); do etcdctl_in_pod put /config/demo/greeting hello >/dev/null 2>&1 && break; sleep 0.1; done
etcdctl_in_pod get /config/demo/greeting >/dev/null
# The time from `podman run` to the first answer the app gets: an app container asks from before
# the sidecar starts until it answers, then prints the kernel's uptime (the host's clock too).
quiet podman run -d --pod "$pod" --name "$pod-first" "$app_image" \
  'until wget -qO /dev/null http://127.0.0.1:7379/v1/kv/config/demo/greeting 2>/dev/null; do sleep 0.02; done; cat /proc/uptime' >/dev/null
run_at=$(cut -d" " -f1 /proc/uptime)
quiet podman run -d --pod "$pod" --name "$pod-sidecar" -v "$volume:/var/lib/config-sidecar" \
  -v "$shared:/shared" -e CONFIG_SIDECAR_RENDER=/config/demo/=/shared/demo.env \
  -e CONFIG_SIDECAR_ENDPOINTS=http://127.0.0.1:2379,http://127.0.0.1:2389,http://127.0.0.1:2399 \
  -e CONFIG_SIDECAR_PREFIXES=/config/demo/ \
  -e CONFIG_SIDECAR_SNAPSHOT=/var/lib/config-sidecar/mirror.snap "$sidecar_image" >/dev/null

# The app's view, from a container in the pod (the rendered files' volume mounted read-only):
# a key's value over HTTP and in the rendered file, and the sidecar's mode.
app() { quiet podman run --rm --pod "$pod" -v "$shared:/shared:ro" "$app_image" "$1"; }
value() { app 'wget -qO- http://127.0.0.1:7379/v1/kv/config/demo/greeting' 2>/dev/null || true; }
rendered() { app 'cat /shared/demo.env' 2>/dev/null || true; }
mode() {
  app 'wget -qO- http://127.0.0.1:7379/v1/status' 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["mode"])' 2>/dev/null || true
}
# Waits until the mode is $1 (failing after 60 s) and says how long since $2 (a `date +%s.%N`,
# by default now) that took.
await_mode() {
  local from=${2:-$(date +%s.%N)}
  for _ in $(seq 1 200); do
    if [ "$(mode)" = "$1" ]; then
      echo "$1 after $(seconds_since "$from") s"
      return
    fi
    sleep 0.2
  done
  podman logs --tail 20 "$pod-sidecar" >&2
  fail "the sidecar did not reach $1 within 60 s (last: $(mode))"
}
# Checks the app reads $1 over HTTP, and in the rendered file (waiting up to 5 s for the file).
expect_value() {
  local got file
  got=$(value)
  [ "$got" = "$1" ] || fail "the app read '$got', want '$1'"
  for _ in $(seq 1 50); do
    file=$(rendered)
    [ "$file" = "GREETING='$1'" ] && break
    sleep 0.1
  done
  [ "$file" = "GREETING='$1'" ] || fail "the rendered file says '$file', want GREETING='$1'"
  echo "the app reads '$got', and GREETING='$1' in /shared/demo.env"
}

quiet podman wait "$pod-first" >/dev/null
answered_at=$(quiet podman logs "$pod-first" | tail -1 | cut -d" " -f1)
echo "podman run → the app's first answer: $(awk -v a="$run_at" -v b="$answered_at" 'BEGIN { printf "%.2f", b - a }') s"
await_mode full
expect_value hello
user=$(quiet podman top "$pod-sidecar" huser | tail -1)
[ "$user" = 65532 ] || fail "the sidecar runs as $user"
quiet podman healthcheck run "$pod-sidecar" || fail "the image's health check"
echo "the sidecar runs as 65532; its HEALTHCHECK passes"

echo "drill: one member paused (frozen: its sockets open and silent)"
quiet podman pause "$pod-m2" >/dev/null
from=$(date +%s.%N)
# A put can fail while the others elect a leader (if the frozen one led): try again.
for _ in $(seq 1 50); do etcdctl_in_pod put /config/demo/greeting frozen >/dev/null 2>&1 && break; sleep 0.2; done
for _ in $(seq 1 150); do [ "$(value)" = frozen ] && break; sleep 0.1; done
expect_value frozen
echo "a change made while a member is frozen reached the app after $(seconds_since "$from") s"
[ "$(mode)" = full ] || fail "one frozen member of three took the sidecar out of full"
quiet podman unpause "$pod-m2" >/dev/null
etcdctl_in_pod put /config/demo/greeting hello >/dev/null
for _ in $(seq 1 50); do [ "$(value)" = hello ] && break; sleep 0.1; done

echo "drill: two members stopped"
quiet podman stop -t 0 "$pod-m2" "$pod-m3" >/dev/null
await_mode read-only
expect_value hello
echo "drill: the third stopped"
quiet podman stop -t 0 "$pod-m1" >/dev/null
await_mode cache-only
echo "drill: the sidecar container restarted during the outage"
quiet podman restart -t 10 "$pod-sidecar" >/dev/null
await_mode cache-only
expect_value hello
echo "drill: members started again, a change made as soon as they have quorum"
from=$(date +%s.%N)
quiet podman start "$pod-m1" "$pod-m2" "$pod-m3" >/dev/null
for _ in $(seq 1 100); do etcdctl_in_pod put /config/demo/greeting changed >/dev/null 2>&1 && break; sleep 0.2; done
echo "the change made while the sidecar was $(mode)"
echo -n "members started: "
await_mode full "$from"
for _ in $(seq 1 50); do [ "$(value)" = changed ] && break; sleep 0.1; done
expect_value changed
quiet podman stop -t 10 "$pod-sidecar" >/dev/null
code=$(quiet podman inspect "$pod-sidecar" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "the sidecar exited $code on podman stop"
echo "podman stop: the sidecar exited 0"
