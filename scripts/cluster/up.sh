#!/usr/bin/env bash
# Brings up a single-node Kubernetes 1.20 on this machine, flannel-shaped:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd,
# kubelet, kube-proxy (iptables) and a bridge CNI (cni0, host-local,
# portmap). Everything it creates is recorded under $work so `down` can undo
# it. Usage: up.sh [IMAGE_DIR]: every *.tar there (OCI archives written by
# `cargo xtask cluster up`) is imported. Idempotent: a cluster that is up
# stays up.
set -euo pipefail
. "$(dirname "$0")/env.sh"
need_root
images="${1:-}"

for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  [ -x "$k8s_bin/$b" ] || die "$k8s_bin/$b missing: run \`cargo xtask cluster install\` first"
done
etcd="$k8s_cache/etcd/usr/bin/etcd"
kubectl=("$k8s_bin/kubectl" --kubeconfig "$work/kubeconfig")
components=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy)

ctr=(ctr --address "$work/containerd/containerd.sock" --namespace k8s.io)
import_images() { # every archive in $images, unpacked for the CRI's snapshotter
  for archive in ${images:+"$images"/*.tar}; do
    [ -e "$archive" ] || continue
    "${ctr[@]}" images import "$archive" >/dev/null || die "importing $archive failed"
  done
  log "images: $("${ctr[@]}" images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
}
running() { [ -f "$work/pids/$1.pid" ] && kill -0 "$(cat "$work/pids/$1.pid")" 2>/dev/null; }
all_running() { for c in "${components[@]}"; do running "$c" || return 1; done; }
if all_running; then
  import_images
  log "already up (KUBECONFIG=$work/kubeconfig)"
  exit 0
fi
if [ -d "$work/pids" ]; then
  log "a previous cluster is partly up: taking it down first"
  "$(dirname "$0")/down.sh"
fi

# The kubelet refuses a loopback node IP: use the address of the interface
# the default route leaves by, unless told otherwise.
node_ip="${PORTCULLIS_NODE_IP:-$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')}"
[ -n "$node_ip" ] || node_ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
[ -n "$node_ip" ] || die "no global IPv4 address for the node; set PORTCULLIS_NODE_IP"

mkdir -p "$work"/{pids,logs,pki,state,etcd,cni/ipam,containerd,kubelet}
echo "$node_ip" >"$work/state/node-ip"
# What `down` must leave as it found: pod namespaces that are not ours, and
# paths the kubelet, containerd and CNI write outside the work dir.
ip netns list 2>/dev/null | awk '{print $1}' >"$work/state/netns-before"
: >"$work/state/created-paths"
# The last two are the Portcullis DaemonSet's (its pins and API socket).
for p in /var/log/pods /var/log/containers /var/lib/cni /run/containerd /var/lib/kubelet /etc/cni /opt/cni \
  "$cni_conf_dir/10-portcullis-test.conflist" "$cni_bin_dir/portcullis" /sys/fs/bpf/portcullis /var/run/portcullis; do
  [ -e "$p" ] || echo "$p" >>"$work/state/created-paths"
done

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what (logs: $work/logs)"
    sleep 0.5
  done
}
start() { # start NAME COMMAND...: a daemon in its own session, logged, PID recorded
  local name=$1; shift
  setsid "$@" >"$work/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$work/pids/$name.pid"
  sleep 0.2
  running "$name" || die "$name exited at once: $(tail -5 "$work/logs/$name.log")"
}

# --- host settings, saved so `down` restores them --------------------------
sysctls=(net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables net.ipv4.conf.all.route_localnet vm.overcommit_memory
  vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
: >"$work/state/sysctls"
for s in "${sysctls[@]}"; do
  v=$(sysctl -n "$s" 2>/dev/null) && printf '%s=%s\n' "$s" "$v" >>"$work/state/sysctls"
done
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
# kubelet 1.20 insists on the v1 hugetlb controller.
if [ -e /sys/fs/cgroup/memory ] && ! mountpoint -q /sys/fs/cgroup/hugetlb; then
  mkdir -p /sys/fs/cgroup/hugetlb
  mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
  touch "$work/state/mounted-hugetlb"
fi
# /sys shared with containers, as systemd leaves every mount on a real node
# (kind's nodes: `mount --make-rshared /`): a DaemonSet that mounts bpffs
# for the host (Bidirectional propagation) needs it. Restored by down.sh.
if [ "$(findmnt -no PROPAGATION /sys)" != shared ]; then
  findmnt -no PROPAGATION /sys >"$work/state/sys-propagation"
  mount --make-rshared /sys
fi

# --- certificates and credentials -----------------------------------------
pki="$work/pki"
if [ ! -f "$pki/ca.crt" ]; then
  log "pki: CA, API server and kubelet-client certificates, service-account key"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=portcullis-test-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cert() { # cert NAME SUBJECT [SAN]
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    local ext="$pki/$1.ext"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$ext"
    [ -z "${3:-}" ] || printf 'subjectAltName=%s\n' "$3" >>"$ext"
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -extfile "$ext" -out "$pki/$1.crt" 2>/dev/null
  }
  cert apiserver "/CN=kube-apiserver" \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$node_name,IP:127.0.0.1,IP:$node_ip,IP:$api_cluster_ip"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  # Static tokens: one identity per component, RBAC's built-in bindings apply.
  tok() { openssl rand -hex 16; }
  cat >"$pki/tokens.csv" <<CSV
$(tok),admin,admin,system:masters
$(tok),system:node:$node_name,kubelet,system:nodes
$(tok),system:kube-controller-manager,kube-controller-manager
$(tok),system:kube-scheduler,kube-scheduler
$(tok),system:kube-proxy,kube-proxy
CSV
  chmod 600 "$pki"/*.key "$pki/tokens.csv"
fi
kubeconfig() { # kubeconfig FILE USER
  local token
  token=$(awk -F, -v u="$2" '$2 == u {print $1}' "$pki/tokens.csv")
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: portcullis
  cluster: {server: "https://$node_ip:6443", certificate-authority: "$pki/ca.crt"}
users:
- name: $2
  user: {token: "$token"}
contexts:
- name: portcullis
  context: {cluster: portcullis, user: "$2"}
current-context: portcullis
KC
  chmod 600 "$1"
}
kubeconfig "$work/kubeconfig" admin
kubeconfig "$work/kubelet.kubeconfig" "system:node:$node_name"
kubeconfig "$work/controller-manager.kubeconfig" system:kube-controller-manager
kubeconfig "$work/scheduler.kubeconfig" system:kube-scheduler
kubeconfig "$work/kube-proxy.kubeconfig" system:kube-proxy

# --- control plane --------------------------------------------------------
log "starting etcd and the control plane"
start etcd "$etcd" --name portcullis --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster portcullis=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
start kube-apiserver "$k8s_bin/kube-apiserver" \
  --etcd-servers http://127.0.0.1:2379 --advertise-address "$node_ip" --secure-port 6443 --insecure-port 0 \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction,ServiceAccount \
  --service-cluster-ip-range "$service_cidr" --allow-privileged \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP,Hostname
wait_for 90 "the API server" "${kubectl[@]}" get --raw /readyz
start kube-controller-manager "$k8s_bin/kube-controller-manager" \
  --kubeconfig "$work/controller-manager.kubeconfig" --leader-elect=false --port 0 \
  --authentication-kubeconfig "$work/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$work/controller-manager.kubeconfig" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials --service-cluster-ip-range "$service_cidr"
start kube-scheduler "$k8s_bin/kube-scheduler" \
  --kubeconfig "$work/scheduler.kubeconfig" --leader-elect=false --port 0 \
  --authentication-kubeconfig "$work/scheduler.kubeconfig" \
  --authorization-kubeconfig "$work/scheduler.kubeconfig"

# --- node: containerd, CNI, images, kubelet, kube-proxy -------------------
cat >"$work/containerd/config.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
[grpc]
  address = "$work/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$work/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  # This VM lacks CAP_SYS_RESOURCE: without this every container fails to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin_dir"
    conf_dir = "$cni_conf_dir"
TOML
# The conventional CNI directories, where a DaemonSet (Portcullis' chained
# plugin) expects them; Debian's plugins linked in, nothing overwritten.
mkdir -p "$cni_bin_dir" "$cni_conf_dir"
for plugin in /usr/lib/cni/*; do
  target="$cni_bin_dir/$(basename "$plugin")"
  [ -e "$target" ] || { ln -s "$plugin" "$target"; echo "$target" >>"$work/state/created-paths"; }
done
cat >"$cni_conf_dir/10-portcullis-test.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "portcullis-test",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$work/cni/ipam",
              "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
start containerd containerd --config "$work/containerd/config.toml"
wait_for 30 containerd "${ctr[@]}" version
import_images

cat >"$work/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
nodeStatusUpdateFrequency: 2s
readOnlyPort: 0
clusterDomain: cluster.local
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
# A test node on a shared disk: evict only when truly out of room.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
# The images are imported, not pulled: one garbage-collected while no pod
# uses it (the disk is over 85% full with build output) cannot come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
YAML
start kubelet "$k8s_bin/kubelet" --config "$work/kubelet/config.yaml" \
  --kubeconfig "$work/kubelet.kubeconfig" --root-dir "$work/kubelet" \
  --container-runtime remote --container-runtime-endpoint "unix://$work/containerd/containerd.sock" \
  --node-ip "$node_ip" --hostname-override "$node_name"

cat >"$work/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$work/kube-proxy.kubeconfig"}
mode: iptables
clusterCIDR: "$pod_cidr"
hostnameOverride: "$node_name"
metricsBindAddress: "127.0.0.1:10249"
healthzBindAddress: "127.0.0.1:10256"
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
start kube-proxy "$k8s_bin/kube-proxy" --config "$work/kube-proxy.yaml"

wait_for 120 "node $node_name to be Ready" \
  "${kubectl[@]}" wait --for=condition=Ready "node/$node_name" --timeout=1s
wait_for 60 "the default service account" "${kubectl[@]}" get serviceaccount default
log "up: node $node_name ($node_ip) Ready; KUBECONFIG=$work/kubeconfig"
