#!/usr/bin/env bash
# Installs and builds everything the single-node test cluster needs, from
# Debian bookworm alone: runtime packages from apt, etcd unpacked privately,
# and Kubernetes 1.20 built from Debian's source package (fully vendored, so
# GOPROXY=off). Idempotent: builds are cached under $k8s_cache by version.
set -euo pipefail
. "$(dirname "$0")/env.sh"
. "$(dirname "$0")/../lib/apt.sh"
need_root

# containerd 1.6 serves CRI v1alpha2, which kubelet 1.20 speaks; the CNI
# plugins give the bridge/host-local/portmap chain; conntrack and socat are
# kube-proxy's and kubelet's helpers; busybox-static becomes the busybox image;
# gcc builds the static pause binary; openssl makes the cluster's certificates.
apt_packages=(golang-go rsync dpkg-dev make gcc libc6-dev containerd runc
  containernetworking-plugins iptables conntrack socat busybox-static openssl
  iproute2 util-linux procps)

# No init system here starts containerd's unit; `up` runs it itself.
apt_ensure "${apt_packages[@]}"

mkdir -p "$k8s_cache"

# etcd: unpacked, never installed, so no system service starts or lingers.
if [ ! -x "$k8s_cache/etcd/usr/bin/etcd" ]; then
  log "etcd: unpacking Debian's etcd-server"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq etcd-server >/dev/null)
  rm -rf "$k8s_cache/etcd"
  dpkg-deb -x "$tmp"/etcd-server_*.deb "$k8s_cache/etcd"
  rm -rf "$tmp"
fi

# A private deb-src list: the machine's apt configuration stays as it was.
apt_dir="$k8s_cache/apt"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
# Each binary and the package `make WHAT=` builds it from; ginkgo runs the
# e2e suite's specs in parallel.
declare -A what=(
  [kube-apiserver]=cmd/kube-apiserver [kube-controller-manager]=cmd/kube-controller-manager
  [kube-scheduler]=cmd/kube-scheduler [kubelet]=cmd/kubelet [kube-proxy]=cmd/kube-proxy
  [kubectl]=cmd/kubectl [agnhost]=test/images/agnhost [e2e.test]=test/e2e/e2e.test
  [ginkgo]=vendor/github.com/onsi/ginkgo/ginkgo)
missing_bins=()
for b in "${!what[@]}"; do [ -x "$k8s_bin/$b" ] || missing_bins+=("$b"); done

if [ ${#missing_bins[@]} -gt 0 ] || [ ! -x "$k8s_bin/pause" ]; then
  if [ ! -f "$k8s_cache/src/.unpacked" ]; then
    log "kubernetes: fetching Debian's source package $k8s_source_version"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$k8s_cache/src"
    cat >"$apt_dir/sources.list" <<LIST
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
LIST
    apt-get "${apt_opts[@]}" update -qq
    rm -rf "$k8s_cache/src"/*
    # Any Debian revision of this upstream version will do (bookworm's is -1.1+deb12u1).
    got=$(apt-cache "${apt_opts[@]}" showsrc kubernetes | sed -n 's/^Version: //p' | head -1)
    case "$got" in "$k8s_source_version"-*) ;; *) die "bookworm's kubernetes source is $got, not $k8s_source_version-*" ;; esac
    (cd "$k8s_cache/src" && apt-get "${apt_opts[@]}" source -qq "kubernetes=$got" >/dev/null 2>&1) \
      || die "apt-get source kubernetes=$got failed"
    touch "$k8s_cache/src/.unpacked"
  fi
  src=$(find "$k8s_cache/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
  [ -n "$src" ] || die "no kubernetes source tree under $k8s_cache/src"
  # Kubernetes' make wraps `go build` with its own version stamping and
  # generated files; plain `go build` does not work on the 1.20 tree.
  export GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 GOCACHE="$k8s_cache/gocache"
  export KUBE_GIT_VERSION="$k8s_upstream_version" KUBE_GIT_TREE_STATE=clean
  whats=()
  for b in "${missing_bins[@]}"; do whats+=("${what[$b]}"); done
  log "kubernetes: building ${missing_bins[*]} (all nine: about 7 minutes on 2 cores; once)"
  [ ${#whats[@]} -eq 0 ] || (cd "$src" && make WHAT="${whats[*]}")
  out="$src/_output/local/bin/linux/$(go env GOARCH)"
  mkdir -p "$k8s_bin"
  for b in "${missing_bins[@]}"; do install -m 0755 "$out/$b" "$k8s_bin/$b"; done
  # pause: the sandbox container's only process.
  gcc -Os -static -o "$k8s_bin/pause" "$src/build/pause/linux/pause.c"
  # The tree and Go's build cache can be rebuilt; the binaries are the cache.
  rm -rf "$k8s_cache/src" "$k8s_cache/gocache"
fi
[ -x "$k8s_bin/pause" ] || die "no pause binary in $k8s_bin"
log "ready: $(ls "$k8s_bin" | tr '\n' ' ')(in $k8s_bin), etcd $("$k8s_cache/etcd/usr/bin/etcd" --version | head -1)"
