# Sourced by scripts/container-test.sh: what every part of the container test shares. Has
# scripts/install-deps.sh install what is missing, points podman at a containers.conf that works here, builds the images (the
# sidecar's, etcd's and the app's, from this machine's files: no image registry), and removes
# everything it made on exit, also when a step fails.

# What it needs (podman, runc, netavark and aardvark-dns, catatonit, busybox, curl, openssl),
# from Debian's packages when missing.
scripts/install-deps.sh --containers

work=$(mktemp -d)
# Everything made, removed by `cleanup`: pods, containers, volumes, networks, secrets, image tags.
made_pods=() made_containers=() made_volumes=() made_networks=() made_secrets=() made_tags=()
made_projects=() # podman-compose projects: their containers, volumes and network
# runc, rlimits under this machine's hard limits (podman's defaults exceed them), and netavark,
# whose networks have DNS for container names (Debian has no dnsname plugin for CNI).
cat >"$work/containers.conf" <<'CONF'
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[network]
network_backend = "netavark"
CONF
export CONTAINERS_CONF="$work/containers.conf"
cleanup() {
  local p
  for p in "${made_projects[@]}"; do
    podman ps -aq --filter "label=io.podman.compose.project=$p" | xargs -r podman rm -f -t 0 >/dev/null 2>&1 || true
    podman volume ls -q --filter "label=io.podman.compose.project=$p" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
    podman network rm -f "${p}_default" >/dev/null 2>&1 || true
  done
  for p in "${made_pods[@]}"; do podman pod rm -f "$p" >/dev/null 2>&1 || true; done
  for p in "${made_containers[@]}"; do podman rm -f -t 0 "$p" >/dev/null 2>&1 || true; done
  for p in "${made_volumes[@]}"; do podman volume rm -f "$p" >/dev/null 2>&1 || true; done
  for p in "${made_networks[@]}"; do podman network rm -f "$p" >/dev/null 2>&1 || true; done
  for p in "${made_secrets[@]}"; do podman secret rm "$p" >/dev/null 2>&1 || true; done
  for p in "${made_tags[@]}"; do podman untag "$p" "$p" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# podman logs an error for each healthcheck timer it cannot give systemd (absent here), and
# aardvark-dns that it has no syslog: noise.
quiet() { "$@" 2> >(grep -v -e 'level=error' -e 'failed to connect to syslog' >&2); }
fail() {
  echo "FAILED: $*" >&2
  exit 1
}
# Seconds since $1 (a `date +%s.%N`), to one decimal.
seconds_since() { awk -v from="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - from }'; }

# Copies the binaries $2... and the libraries they load into the root file system $1.
copy_with_libraries() {
  local root=$1 lib
  shift
  mkdir -p "$root/usr/bin"
  cp "$@" "$root/usr/bin/"
  for lib in $(ldd "$@" | awk '/=> \//{print $3} /^\t\//{print $1}' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# The images: the sidecar's (scripts/build-image.sh), etcd from Debian's binary, the app from
# busybox (and Debian's curl: the manifest's app calls curl).
built=$(scripts/build-image.sh 2>"$work/build.log" | tail -1) ||
  { cat "$work/build.log" >&2; fail "scripts/build-image.sh"; }
echo "image: $built"
sidecar_image=${built%%:dev*}:dev
etcd_image=localhost/config-sidecar-test-etcd:dev
app_image=localhost/config-sidecar-test-app:dev
mkdir -p "$work/etcd/rootfs/var/lib/etcd" "$work/etcd/rootfs/tmp"
copy_with_libraries "$work/etcd/rootfs" /usr/bin/etcd /usr/bin/etcdctl
printf 'FROM scratch\nCOPY rootfs /\nENTRYPOINT ["/usr/bin/etcd"]\n' >"$work/etcd/Containerfile"
quiet podman build -q -t "$etcd_image" "$work/etcd" >/dev/null
mkdir -p "$work/app/rootfs/bin" "$work/app/rootfs/tmp"
copy_with_libraries "$work/app/rootfs" "$(command -v curl)"
cp /bin/busybox "$work/app/rootfs/bin/"
for tool in sh wget cat sleep; do ln -s busybox "$work/app/rootfs/bin/$tool"; done
printf 'FROM scratch\nCOPY rootfs /\nENV PATH=/usr/bin:/bin\nENTRYPOINT ["/bin/sh", "-c"]\n' >"$work/app/Containerfile"
quiet podman build -q -t "$app_image" "$work/app" >/dev/null
