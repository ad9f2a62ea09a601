#!/usr/bin/env bash
# Make sure the Debian binaries that the tests and the demo need are installed.
#   scripts/ensure-deps.sh [EXTRA_TOOL ...]    e.g. amtool docker-compose
# Always checks mosquitto and promtool. Quiet when everything is present.
# Installs missing packages with apt-get when run as root, without letting the
# packages' postinst scripts leave a broker or Prometheus running.
set -euo pipefail

declare -A PKG=(
  [mosquitto]=mosquitto
  [mosquitto_sub]=mosquitto-clients
  [mosquitto_pub]=mosquitto-clients
  [promtool]=prometheus
  [prometheus]=prometheus
  [amtool]=prometheus-alertmanager
  [docker-compose]=docker-compose
)
# Ports the installed daemons would listen on by default.
DAEMON_PORTS='1883|9090|9093'

have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

# "pid port" lines for processes listening on the daemon ports.
listeners() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp 2>/dev/null | awk -v re=":(${DAEMON_PORTS})\$" '
    $4 ~ re { port = $4; sub(/.*:/, "", port)
              s = $0; while (match(s, /pid=[0-9]+/)) {
                print substr(s, RSTART + 4, RLENGTH - 4), port; s = substr(s, RSTART + RLENGTH) } }' | sort -u
}

missing_pkgs=()
# `make` builds .venv with python3 -m venv: Debian's python3 needs python3-venv for that.
if ! "${PYTHON:-python3}" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing_pkgs+=(python3-venv)
fi
for tool in mosquitto promtool "$@"; do
  pkg=${PKG[$tool]:-}
  if [ -z "$pkg" ]; then
    echo "ensure-deps: unknown tool '$tool' (known: ${!PKG[*]})" >&2
    exit 2
  fi
  have "$tool" && continue
  [[ " ${missing_pkgs[*]-} " == *" $pkg "* ]] || missing_pkgs+=("$pkg")
done
[ ${#missing_pkgs[@]} -eq 0 ] && exit 0

cmd="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing_pkgs[*]}"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-deps: missing Debian packages: ${missing_pkgs[*]}" >&2
  echo "ensure-deps: install them as root with:  $cmd" >&2
  exit 1
fi

echo "ensure-deps: installing ${missing_pkgs[*]}" >&2
# Keep postinst scripts from starting services (invoke-rc.d honours exit 101).
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
trap 'if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT

before=$(listeners)
log=$(mktemp)
if ! { apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 \
         apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"
  echo "ensure-deps: apt-get failed (command: $cmd)" >&2
  exit 1
fi
rm -f "$log"

# Belt and braces: stop any daemon the install left listening (new pids only).
after=$(listeners)
new=$(comm -13 <(echo "$before") <(echo "$after") | awk 'NF' || true)
if [ -n "$new" ]; then
  while read -r pid port; do
    name=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    case $name in mosquitto|prometheus*|alertmanager) ;; *) continue ;; esac
    echo "ensure-deps: stopping $name (pid $pid) that the install left listening on port $port" >&2
    kill "$pid" 2>/dev/null || true
  done <<<"$new"
fi

for tool in mosquitto promtool "$@"; do
  have "$tool" || { echo "ensure-deps: $tool still missing after install" >&2; exit 1; }
done
echo "ensure-deps: done" >&2
