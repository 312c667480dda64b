# Sourced by scripts/container-test.sh (after containers/lib.sh): docker/compose.yml itself, run by
# podman-compose (from PyPI, pinned) on podman's netavark network, whose DNS gives the services'
# names: the sidecar (the static binary) reaches etcd1..3 by name, as with `docker compose`. The
# images go by the names the file gives (quay.io's etcd and curlimages/curl are made here; the
# sidecar's is the one podman-compose would build from the file's `build:`, so it is not rebuilt).
# The app prints each answer's headers and the rendered file: its log is what the test reads.
# The outage drill itself is drill.sh's, on loopback addresses: here, stopping and starting
# members also tested podman's DNS, whose name lookups failed for ~40 s in 2 of 6 runs while
# etcd had quorum again (aardvark-dns 1.4; see docs/tests.md).

project=config-sidecar-compose-$$
python3 -m venv "$work/compose-venv"
"$work/compose-venv/bin/pip" install -q podman-compose==1.6.0
compose() { (cd docker && quiet "$work/compose-venv/bin/podman-compose" -p "$project" "$@"); }
made_projects+=("$project")
made_tags+=(quay.io/coreos/etcd:v3.5.17 docker.io/curlimages/curl:8.11.1 "localhost/${project}_sidecar:latest")
podman tag "$etcd_image" quay.io/coreos/etcd:v3.5.17
podman tag "$app_image" docker.io/curlimages/curl:8.11.1
podman tag "$sidecar_image" "localhost/${project}_sidecar:latest"

echo "podman-compose up on docker/compose.yml"
compose up -d >/dev/null
for _ in $(seq 1 100); do compose exec etcd1 etcdctl put /config/demo/greeting hello >/dev/null 2>&1 && break; sleep 0.2; done

# Waits (up to 60 s) until one round of the app's log shows mode $1 and greeting $2, over HTTP
# and in the rendered file; says how long since $3 (a `date +%s.%N`, by default now).
app_shows() {
  local from=${3:-$(date +%s.%N)} log
  for _ in $(seq 1 600); do
    log=$(podman logs --tail 14 "${project}_app_1" 2>&1)
    if grep -qi "^x-config-mode: $1" <<<"$log" && grep -qF "{\"greeting\":\"$2\"}" <<<"$log" &&
      grep -qF "GREETING='$2'" <<<"$log"; then
      echo "the app shows $1 and '$2' (HTTP and file) after $(seconds_since "$from") s"
      return
    fi
    sleep 0.1
  done
  echo "$log" >&2
  fail "the compose app does not show mode $1 and '$2'"
}
app_shows full hello
echo "(the sidecar reached etcd1..3 by their service names)"
compose exec etcd1 etcdctl put /config/demo/greeting composed >/dev/null
app_shows full composed
compose stop -t 10 sidecar >/dev/null
code=$(podman inspect "${project}_sidecar_1" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "the compose sidecar exited $code on stop"
compose down -v -t 1 >/dev/null 2>&1 # (etcd takes more than 1 s to stop: a warning, then SIGKILL)
[ -z "$(podman ps -aq --filter "label=io.podman.compose.project=$project")" ] ||
  fail "podman-compose down left containers"
echo "podman-compose: the sidecar exited 0 on stop; down removed the stack"
