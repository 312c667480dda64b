#!/usr/bin/env bash
# Makes sure this machine can build and test config-sidecar, installing from Debian's packages
# what is missing. Each need is checked as a capability (the thing works), not as a command
# name, because a command can be there while what it needs is not: protoc without the
# well-known .proto files of libprotobuf-dev is what broke a fresh machine's build once.
#
#   need               package            checked by                                  used by
#   C toolchain        gcc, libc6-dev     cc compiles and links a C program, also     ring's build, rustc's linker,
#                                         as a static PIE (libc.a, rcrt1.o)           scripts/build-static.sh
#   protoc             protobuf-compiler  protoc --version answers                    etcd-client's build
#   well-known protos  libprotobuf-dev    protoc compiles a file importing            etcd-client's build
#                                         google/protobuf/{descriptor,struct}.proto
#   etcd               etcd-server        etcd --version answers 3.x                  every integration test
#   etcdctl            etcd-client        etcdctl version answers                     scripts/run-local.sh's seed
#   nginx              nginx-light        nginx -t accepts the benchmark's config     the load benchmark
#   wrk                wrk                wrk -v prints its version                   the load benchmark
#   python venv        python3-venv       python3 -m venv makes an environment whose  the client tests (etcd3gw
#                                         pip runs (pip then installs from PyPI)      from PyPI, tests/clients)
#
# With --containers, also what scripts/container-test.sh needs (CI runs it; the suite does not):
#   podman             podman             podman --version answers                    every container step
#   runc               runc               runc --version answers (Debian 12's crun    podman (containers.conf
#                                         refuses this kernel's hybrid cgroups)       of the test)
#   netavark           netavark           podman's netavark runs                      podman's networks
#   aardvark-dns       aardvark-dns       podman's aardvark-dns runs                  names on them (compose)
#   pause process      catatonit          podman's catatonit runs                     pods (kube play too)
#   busybox            busybox-static     a static busybox whose wget runs            the app image
#   curl               curl               curl --version answers                      the manifest's app image
#   openssl            openssl            openssl makes an EC key                     etcd's TLS in kube.sh
#
# Packages are installed with --no-install-recommends, so every package a need takes is named
# above (protobuf-compiler only *recommends* libprotobuf-dev; gcc only recommends libc6-dev).
# After installing, every check runs again, and a need still missing fails with its package named.
set -euo pipefail

scratch=$(mktemp -d "${TMPDIR:-/tmp}/install-deps.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
# Debian puts nginx in /usr/sbin, which not every user's PATH has.
export PATH="$PATH:/usr/sbin:/sbin"

has_c_toolchain() {
  printf '#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n' >"$scratch/t.c"
  cc -o "$scratch/t" "$scratch/t.c" >/dev/null 2>&1 && [ "$("$scratch/t")" = ok ] &&
    # scripts/build-static.sh links the binary statically: glibc's static archives must be there.
    cc -static-pie -o "$scratch/ts" "$scratch/t.c" >/dev/null 2>&1 && [ "$("$scratch/ts")" = ok ]
}

has_protoc() {
  "${PROTOC:-protoc}" --version >/dev/null 2>&1
}

# etcd-client's protos import these two; prost-build finds them through protoc's own include path.
has_well_known_protos() {
  cat >"$scratch/wkt.proto" <<'EOF'
syntax = "proto3";
import "google/protobuf/descriptor.proto";
import "google/protobuf/struct.proto";
message Probe { google.protobuf.Struct s = 1; google.protobuf.FieldDescriptorProto f = 2; }
EOF
  "${PROTOC:-protoc}" --proto_path="$scratch" --descriptor_set_out=/dev/null "$scratch/wkt.proto" >/dev/null 2>&1
}

has_etcd() {
  [[ $("${ETCD_BIN:-etcd}" --version 2>/dev/null) == "etcd Version: 3."* ]]
}

has_etcdctl() {
  [[ $(ETCDCTL_API=3 etcdctl version 2>/dev/null) == "etcdctl version: 3."* ]]
}

# The same directives the load benchmark's nginx.conf uses; -t parses and loads it, binds nothing.
has_nginx() {
  mkdir -p "$scratch/nginx"
  cat >"$scratch/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $scratch/nginx/nginx.pid;
error_log $scratch/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nodelay on; keepalive_requests 1000000;
  server { listen 127.0.0.1:8; location / { root $scratch/nginx; } } }
EOF
  nginx -t -q -p "$scratch/nginx" -c "$scratch/nginx/nginx.conf" >/dev/null 2>&1
}

# wrk -v prints its version (and exits 1); it runs only when its shared libraries (LuaJIT) load.
has_wrk() {
  [[ $(wrk -v 2>&1) == "wrk "*"Copyright"* ]]
}

# The client tests install real clients (etcd3gw) from PyPI into a virtualenv of their own.
has_python_venv() {
  python3 -m venv "$scratch/venv" >/dev/null 2>&1 && "$scratch/venv/bin/python" -m pip --version >/dev/null 2>&1
}

has_podman() { podman --version >/dev/null 2>&1; }
has_runc() { runc --version >/dev/null 2>&1; }
has_netavark() { /usr/lib/podman/netavark --version >/dev/null 2>&1; }
has_aardvark_dns() { /usr/lib/podman/aardvark-dns --version >/dev/null 2>&1; }
has_catatonit() {
  local c
  for c in /usr/libexec/podman/catatonit "$(command -v catatonit || true)"; do
    [ -x "$c" ] && "$c" --version >/dev/null 2>&1 && return 0
  done
  return 1
}
# The app image copies /bin/busybox alone: it must be the static build, and have wget.
has_busybox() {
  [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 && /bin/busybox wget --help >/dev/null 2>&1
}
has_curl() { curl --version >/dev/null 2>&1; }
has_openssl() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$scratch/k.pem" >/dev/null 2>&1
}

needs=(c_toolchain protoc well_known_protos etcd etcdctl nginx wrk python_venv)
if [ "${1:-}" = --containers ]; then
  needs+=(podman runc netavark aardvark_dns catatonit busybox curl openssl)
fi
declare -A packages=(
  [c_toolchain]="gcc libc6-dev"
  [protoc]=protobuf-compiler
  [well_known_protos]=libprotobuf-dev
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [nginx]=nginx-light
  [wrk]=wrk
  [python_venv]=python3-venv
  [podman]=podman
  [runc]=runc
  [netavark]=netavark
  [aardvark_dns]=aardvark-dns
  [catatonit]=catatonit
  [busybox]=busybox-static
  [curl]=curl
  [openssl]=openssl
)

missing() {
  local need
  for need in "${needs[@]}"; do "has_$need" || echo "$need"; done
}

mapfile -t absent < <(missing)
[ ${#absent[@]} -eq 0 ] && exit 0

install=()
for need in "${absent[@]}"; do read -ra pkgs <<<"${packages[$need]}"; install+=("${pkgs[@]}"); done
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: missing ${absent[*]}; install as root: apt-get install --no-install-recommends ${install[*]}" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "install-deps: missing ${absent[*]}: installing ${install[*]}" >&2
# A fresh machine has no package lists: update once first.
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${install[@]}" >/dev/null
# Debian starts the service of etcd-server and of nginx on install; the tests run their own.
# Only a service this run installed is stopped: one the machine already ran is not ours.
for need in etcd nginx; do
  if printf '%s\n' "${absent[@]}" | grep -qx "$need"; then
    $sudo service "$need" stop >/dev/null 2>&1 || true
  fi
done

mapfile -t still < <(missing)
if [ ${#still[@]} -gt 0 ]; then
  for need in "${still[@]}"; do
    echo "install-deps: '$need' still does not work after installing; check Debian's package ${packages[$need]}" >&2
  done
  exit 1
fi
