# Sourced by scripts/container-test.sh (after containers/lib.sh): docker/k8s/deployment.yaml run
# by `podman kube play`, as a cluster would run it. What a cluster provides, the test makes: three
# etcd containers (TLS with client certificates, auth on, a user that may read /config/demo/) on
# a network of their own, the Secret the manifest mounts (as podman's secret), the images under
# the manifest's names, and the names etcd-N.etcd (a headless Service's DNS in a cluster) as host
# aliases added to the copy played: nothing else in the manifest is changed.

kube_net=config-sidecar-kube-$$
subnet=10.89.$(($$ % 200 + 20))
kube_pod=demo-app-pod-0
made_networks+=("$kube_net")
made_pods+=("$kube_pod")
quiet podman network create --subnet "$subnet.0/24" "$kube_net" >/dev/null

# TLS: a CA, the members' certificate (their names and addresses), the sidecar's client one.
tls=$work/tls
mkdir -p "$tls"
issue() { # file name, subject, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$2" \
    -keyout "$tls/$1.key" -out "$tls/$1.csr" 2>/dev/null
  openssl x509 -req -in "$tls/$1.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 1 -extfile <(printf '%s\n' "$3") -out "$tls/$1.crt" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=test-etcd-ca \
  -days 1 -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
issue server etcd "subjectAltName=DNS:etcd-0.etcd,DNS:etcd-1.etcd,DNS:etcd-2.etcd,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue client demo-app "extendedKeyUsage=clientAuth"
chmod 0644 "$tls"/*

# The members: etcd-N at $subnet.1N, clients over TLS with certificates, peers in plain HTTP.
peers=""
for n in 0 1 2; do peers+="${peers:+,}etcd-$n=http://$subnet.1$n:2380"; done
for n in 0 1 2; do
  made_containers+=("$kube_net-etcd-$n")
  quiet podman run -d --name "$kube_net-etcd-$n" --network "$kube_net" --ip "$subnet.1$n" \
    -v "$tls:/tls:ro" "$etcd_image" --name "etcd-$n" --data-dir /var/lib/etcd \
    --initial-cluster "$peers" --listen-peer-urls "http://$subnet.1$n:2380" \
    --initial-advertise-peer-urls "http://$subnet.1$n:2380" \
    --listen-client-urls "https://0.0.0.0:2379" --advertise-client-urls "https://etcd-$n.etcd:2379" \
    --client-cert-auth --trusted-ca-file /tls/ca.crt --cert-file /tls/server.crt \
    --key-file /tls/server.key >/dev/null
done
etcdctl_kube() {
  quiet podman exec "$kube_net-etcd-0" /usr/bin/etcdctl --endpoints https://127.0.0.1:2379 \
    --cacert /tls/ca.crt --cert /tls/client.crt --key /tls/client.key "$@"
}
for _ in $(seq 1 100); do etcdctl_kube put /config/demo/greeting hello >/dev/null 2>&1 && break; sleep 0.1; done
# Authentication on: root, and demo-app (the manifest's user) that may read /config/demo/ only.
{
  etcdctl_kube user add root:root-pw
  etcdctl_kube user grant-role root root
  etcdctl_kube role add demo-read
  etcdctl_kube role grant-permission demo-read --prefix=true read /config/demo/
  etcdctl_kube user add demo-app:demo-pw
  etcdctl_kube user grant-role demo-app demo-read
  etcdctl_kube auth enable
} >/dev/null
etcdctl_kube --user root:root-pw get /config/demo/greeting >/dev/null

# The Secret the manifest mounts: podman's secret holding a Kubernetes Secret. podman 4.3 writes
# its `data` values into the files as they are, without decoding base64 (and ignores
# `stringData`), so they go in as plain text: a quirk of the podman here, not of the manifest.
indent() { sed 's/^/    /' "$1"; }
cat >"$work/secret.yaml" <<SECRET
apiVersion: v1
kind: Secret
metadata: { name: config-sidecar-etcd }
data:
  ca.crt: |
$(indent "$tls/ca.crt")
  tls.crt: |
$(indent "$tls/client.crt")
  tls.key: |
$(indent "$tls/client.key")
  password: demo-pw
SECRET
# podman mounts it through a volume of the same name.
made_secrets+=(config-sidecar-etcd)
made_volumes+=(config-sidecar-etcd)
podman secret create config-sidecar-etcd "$work/secret.yaml" >/dev/null
# The manifest's images: the sidecar's, and the app (curl and a shell) made here.
made_tags+=(localhost/config-sidecar:latest docker.io/curlimages/curl:8.11.1)
podman tag "$sidecar_image" localhost/config-sidecar:latest
podman tag "$app_image" docker.io/curlimages/curl:8.11.1
# The copy played: the manifest, and host aliases for the members' names.
aliases="      hostAliases:"
for n in 0 1 2; do aliases+="\n        - { ip: \"$subnet.1$n\", hostnames: [\"etcd-$n.etcd\"] }"; done
sed "/^      securityContext:/i\\$aliases" docker/k8s/deployment.yaml >"$work/deployment.yaml"
grep -q 'hostnames: \["etcd-2.etcd"\]' "$work/deployment.yaml" || fail "the host aliases were not added"

# podman 4.3 makes an emptyDir a named volume of the same name (shared by the replicas' pods);
# removed at the end unless it was there before.
podman volume exists snapshot || made_volumes+=(snapshot)

echo "podman kube play docker/k8s/deployment.yaml (etcd over TLS, auth on, 2 replicas)"
from=$(date +%s.%N)
quiet podman kube play --network "$kube_net" "$work/deployment.yaml" >/dev/null
pods=(demo-app-pod-0 demo-app-pod-1)
made_pods+=("${pods[@]}")

# The probes, run as the kubelet runs them: the exec command in the container. (podman 4.3 turns
# an exec probe into a CMD-SHELL health check, which needs a shell this image does not have.)
readiness=(/usr/local/bin/config-sidecar --healthcheck /readyz)
liveness=(/usr/local/bin/config-sidecar --healthcheck)
grep -qF 'command: ["/usr/local/bin/config-sidecar", "--healthcheck", "/readyz"]' docker/k8s/deployment.yaml ||
  fail "the manifest's readiness probe is not the one run here"
for p in "${pods[@]}"; do
  for _ in $(seq 1 300); do
    quiet podman exec "$p-config-sidecar" "${readiness[@]}" >/dev/null 2>&1 && break
    sleep 0.1
  done
  quiet podman exec "$p-config-sidecar" "${readiness[@]}" >/dev/null || {
    podman logs --tail 20 "$p-config-sidecar" >&2
    fail "$p: the readiness probe does not pass"
  }
  quiet podman exec "$p-config-sidecar" "${liveness[@]}" >/dev/null || fail "$p: the liveness probe"
  user=$(quiet podman top "$p-config-sidecar" huser | tail -1)
  [ "$user" = 65532 ] || fail "$p: the sidecar runs as $user"
  [ "$(podman inspect "$p-config-sidecar" --format '{{.HostConfig.ReadonlyRootfs}}')" = true ] ||
    fail "$p: the root file system is writable"
done
echo "both pods ready $(seconds_since "$from") s after kube play; probes pass; user 65532, read-only root"

# The app's log (it prints the value over HTTP, then the rendered file, every 5 s) shows $1.
app_reads() {
  local p=$1 value=$2 log
  for _ in $(seq 1 300); do
    # (podman's log splits curl's line, which has no newline of its own: match loosely.)
    log=$(podman logs --tail 6 "$p-app" 2>&1)
    grep -qF "GREETING='$value'" <<<"$log" &&
      sed "s/GREETING='$value'//g" <<<"$log" | grep -qF "$value" && return
    sleep 0.1
  done
  echo "$log" >&2
  fail "$p: the app does not read '$value' over HTTP and in /shared/demo.env"
}
for p in "${pods[@]}"; do app_reads "$p" hello; done
etcdctl_kube --user root:root-pw put /config/demo/greeting from-kube >/dev/null
for p in "${pods[@]}"; do app_reads "$p" from-kube; done
echo "both apps read the value and the rendered file, and a change"

# A pod deleted in Kubernetes gets SIGTERM and 30 s of grace; podman 4.3's `kube down` gives
# none (it stops the pods with a zero timeout: SIGKILL, exit 137, whatever the program does). So
# the pods are stopped as a kubelet would, then `kube down` removes them.
quiet podman pod stop -t 30 "${pods[@]}" >/dev/null
for p in "${pods[@]}"; do
  code=$(quiet podman inspect "$p-config-sidecar" --format '{{.State.ExitCode}}')
  [ "$code" = 0 ] || fail "$p: the sidecar exited $code on SIGTERM"
done
quiet podman kube down "$work/deployment.yaml" >/dev/null
for p in "${pods[@]}"; do
  ! podman pod exists "$p" || fail "$p is still there after podman kube down"
done
echo "pods stopped (SIGTERM): both sidecars exited 0; podman kube down removed them"
