#!/usr/bin/env bash
# Stops the test cluster and removes everything `up` created: processes (by
# recorded PID), containers, pod network namespaces, the bridge, KUBE-/CNI-
# iptables chains, mounts, kubepods cgroups, sysctls (restored to the values
# saved by `up`) and the work dir. Safe to run twice, or on a half-up cluster.
set -euo pipefail
. "$(dirname "$0")/env.sh"
need_root

if [ ! -d "$work" ]; then
  log "nothing to take down ($work does not exist)"
  exit 0
fi

stop() { # stop NAME: SIGTERM, then SIGKILL after 10 s
  local f="$work/pids/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# The node first, so nothing restarts what is being removed.
stop kube-proxy
stop kubelet

# Containers: kill every task through containerd while it runs, so shims
# unmount their root filesystems and exit on their own.
sock="$work/containerd/containerd.sock"
ctr=(ctr --address "$sock" --namespace k8s.io)
if [ -S "$sock" ] && "${ctr[@]}" version >/dev/null 2>&1; then
  for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
    "${ctr[@]}" tasks kill --all --signal SIGKILL "$t" >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 50); do
    [ -z "$("${ctr[@]}" tasks ls -q 2>/dev/null | head -1)" ] && break
    for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
      "${ctr[@]}" tasks delete --force "$t" >/dev/null 2>&1 || true
    done
    sleep 0.2
  done
fi
stop containerd
# Shims of this containerd that outlived it (and anything still in kubepods).
for p in /proc/[0-9]*; do
  cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
  case "$cmd" in *containerd-shim*"$sock"*) kill -9 "${p#/proc/}" 2>/dev/null || true ;; esac
done
for procs in /sys/fs/cgroup/*/kubepods/cgroup.procs; do
  [ -e "$procs" ] || continue
  find "$(dirname "$procs")" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null || true
done

stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd

# Pod network namespaces the CRI created (not those that existed before up).
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cni-' || true); do
  grep -qx "$ns" "$work/state/netns-before" 2>/dev/null || ip netns delete "$ns" 2>/dev/null || true
done
ip link show "$bridge" >/dev/null 2>&1 && ip link delete "$bridge"

# iptables: drop every KUBE-/CNI- chain and every rule that jumps to one;
# the rest of each table is restored as it is.
for family in iptables ip6tables; do
  command -v "$family-save" >/dev/null || continue
  dump=$("$family-save") || continue
  if grep -qE '(KUBE-|CNI-)' <<<"$dump"; then
    grep -vE '^(:|-A )?(KUBE-|CNI-)|-A [A-Z-]+ .*-j (KUBE-|CNI-)|^-A (KUBE-|CNI-)' <<<"$dump" | "$family-restore"
  fi
done

# Mounts left under the work dir (pod volumes, rootfs), deepest first.
awk -v w="$work" '$2 == w || index($2, w "/") == 1 {print $2}' /proc/mounts | sort -r |
  while read -r m; do umount -l "$m" 2>/dev/null || true; done

# kubepods cgroups in every v1 hierarchy (and v2, if mounted), leaves first.
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
  [ -d "$root" ] || continue
  find "$root" -depth -type d -exec rmdir {} + 2>/dev/null || true
done
if [ -f "$work/state/sys-propagation" ]; then
  mount "--make-r$(cat "$work/state/sys-propagation")" /sys 2>/dev/null || true
fi
if [ -f "$work/state/mounted-hugetlb" ]; then
  umount /sys/fs/cgroup/hugetlb 2>/dev/null && rmdir /sys/fs/cgroup/hugetlb 2>/dev/null || true
fi

if [ -f "$work/state/sysctls" ]; then
  while IFS= read -r kv; do sysctl -qw "$kv" 2>/dev/null || true; done <"$work/state/sysctls"
fi
# Paths the kubelet and CNI write outside the work dir, if up found them absent.
while IFS= read -r p; do [ -n "$p" ] && rm -rf "$p"; done <"$work/state/created-paths" 2>/dev/null || true

rm -rf "$work"
log "down: processes stopped, $bridge, pod namespaces, KUBE-/CNI- chains, mounts, cgroups removed, sysctls restored"
