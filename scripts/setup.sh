#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test Portcullis:
# Debian's rustc-web (a prebuilt `core` for bpfel-unknown-none, so no nightly)
# and bpf-linker built against the same LLVM. Idempotent; a second run only checks.
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/portcullis"
bpf_linker_version=0.13.0
# rustc-web ships the prebuilt core for bpfel-unknown-none; iproute2, procps and
# util-linux (nsenter) make the lab's and tests' network namespaces; iptables
# writes the DNAT rules that stand in for kube-proxy, and with ipset the
# kube-router-style rules the datapath benchmark compares against.
apt_packages=(rustc-web cargo-web libstd-rust-web-dev-bpf iproute2 procps util-linux iptables ipset)

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "run as root: it installs apt packages and later steps load BPF programs"
  exit 1
fi

. "$(dirname "$0")/lib/apt.sh"
apt_ensure "${apt_packages[@]}"

# The eBPF crate is compiled by Debian's rustc; bpf-linker must use its LLVM.
llvm_major=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm_major" ] || { log "cannot read the LLVM version of /usr/bin/rustc"; exit 1; }
installed "llvm-${llvm_major}-dev" || apt_install "llvm-${llvm_major}-dev"

linker_root="$cache/bpf-linker-${bpf_linker_version}-llvm${llvm_major}"
if [ ! -x "$linker_root/bin/bpf-linker" ]; then
  log "building bpf-linker ${bpf_linker_version} against LLVM ${llvm_major} (about a minute)"
  LLVM_PREFIX="/usr/lib/llvm-${llvm_major}" cargo install --quiet --locked \
    --root "$linker_root" "bpf-linker@${bpf_linker_version}" \
    --no-default-features --features "llvm-${llvm_major}"
fi
# cargo finds bpf-linker on PATH; a stable link keeps the PATH entry short.
mkdir -p "$cache/bin"
ln -sfn "$linker_root/bin/bpf-linker" "$cache/bin/bpf-linker"
log "ready (bpf-linker: $cache/bin/bpf-linker, LLVM ${llvm_major})"
