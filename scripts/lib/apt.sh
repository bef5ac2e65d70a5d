# apt helpers shared by scripts/setup.sh and scripts/cluster/install.sh;
# sourced after the caller defines log().
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
apt_updated=
apt_install() {
  log "apt: installing $*"
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# apt_ensure PACKAGE...: installs those not installed yet, in one go.
apt_ensure() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}
