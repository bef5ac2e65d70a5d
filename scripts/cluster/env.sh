# Paths and versions shared by the cluster scripts; sourced, not run.
# Builds (rebuildable, keyed by version) live under the user's cache; the
# running cluster's state lives in one work dir that `down` removes.
k8s_source_version="1.20.5+really1.20.2"
k8s_upstream_version="v1.20.2"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/portcullis"
k8s_cache="$cache/kubernetes-${k8s_source_version}"
k8s_bin="$k8s_cache/bin"
work="${PORTCULLIS_CLUSTER_DIR:-/var/lib/portcullis-cluster}"
# Everything the node talks over: pod CIDR on the bridge, Service CIDR for
# kube-proxy, and the Kubernetes API's ClusterIP (first address of the range).
pod_cidr="10.244.0.0/24"
service_cidr="10.96.0.0/16"
api_cluster_ip="10.96.0.1"
node_name="portcullis-node"
bridge="cni0"
cni_bin_dir=/opt/cni/bin
cni_conf_dir=/etc/cni/net.d
# Image names need a registry host, or containerd prefixes docker.io/.
registry="registry.portcullis.test"

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "run as root: the cluster runs kubelet, containerd and kube-proxy"; }
