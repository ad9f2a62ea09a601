#!/usr/bin/env bash
# Make sure the Debian binaries that the tests and the demo need are installed.
#   scripts/ensure-deps.sh [EXTRA_TOOL ...]    e.g. amtool docker-compose
#   scripts/ensure-deps.sh --wait-for-locks    only wait until no process holds the apt locks
# Always checks mosquitto and promtool. Quiet when everything is present.
# Installs missing packages with apt-get when run as root, without letting the
# packages' postinst scripts leave a broker or Prometheus running.
# When another apt/dpkg process holds the package locks (a fresh VM's unattended-upgrades does
# for minutes after boot), it waits for them, up to ENSURE_DEPS_LOCK_TIMEOUT seconds (default
# 300), saying which process holds them, instead of failing at once.
set -euo pipefail

# The locks apt-get update/install take (apt and dpkg use fcntl record locks on these files).
read -r -a APT_LOCKS <<<"${ENSURE_DEPS_APT_LOCKS:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock}"
LOCK_TIMEOUT=${ENSURE_DEPS_LOCK_TIMEOUT:-300}
LOCK_POLL=${ENSURE_DEPS_LOCK_POLL:-2}

# "path pid" of the first lock another process holds; nothing when all are free. Asks the
# kernel who holds the lock (F_GETLK) without taking it, so it never gets in apt's way.
lock_holder() {
  "${PYTHON:-python3}" - "${APT_LOCKS[@]}" <<'PY'
import fcntl, os, struct, sys
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        continue
    try:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid; ask about a write lock on all.
        res = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("@hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError:
        continue
    finally:
        os.close(fd)
    l_type, _, _, _, pid = struct.unpack("@hhqqi", res)
    if l_type != fcntl.F_UNLCK:
        print(path, pid)
        break
PY
}

# Wait (bounded) until no other process holds an apt/dpkg lock. Exit 1 at the deadline.
wait_for_apt_locks() {
  "${PYTHON:-python3}" -c 'import fcntl' >/dev/null 2>&1 || return 0  # nothing to ask with
  local start=$SECONDS held path pid name last_said=-1000
  while held=$(lock_holder) && [ -n "$held" ]; do
    read -r path pid <<<"$held"
    name=$(cat "/proc/$pid/comm" 2>/dev/null || echo '?')
    if [ $((SECONDS - start)) -ge "$LOCK_TIMEOUT" ]; then
      echo "ensure-deps: $path is still held by pid $pid ($name) after ${LOCK_TIMEOUT} s;" \
           "let it finish (or set ENSURE_DEPS_LOCK_TIMEOUT) and run this again" >&2
      exit 1
    fi
    if [ $((SECONDS - last_said)) -ge 30 ]; then
      echo "ensure-deps: waiting for $path, held by pid $pid ($name), another apt/dpkg run" \
           "(up to ${LOCK_TIMEOUT} s, $((SECONDS - start)) s so far)" >&2
      last_said=$SECONDS
    fi
    sleep "$LOCK_POLL"
  done
}

if [ "${1:-}" = --wait-for-locks ]; then
  wait_for_apt_locks
  exit 0
fi

declare -A PKG=(
  [mosquitto]=mosquitto
  [mosquitto_sub]=mosquitto-clients
  [mosquitto_pub]=mosquitto-clients
  [promtool]=prometheus
  [prometheus]=prometheus
  [amtool]=prometheus-alertmanager
  [docker-compose]=docker-compose
  [podman]=podman
  [runc]=runc
  [debootstrap]=debootstrap
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
wait_for_apt_locks
log=$(mktemp)
# DPkg::Lock::Timeout: apt itself waits too, should another run grab the lock right now.
if ! { apt-get -o "DPkg::Lock::Timeout=$LOCK_TIMEOUT" update -qq &&
       DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 \
         apt-get -o "DPkg::Lock::Timeout=$LOCK_TIMEOUT" install -y -qq \
           --no-install-recommends "${missing_pkgs[@]}"; } >"$log" 2>&1; then
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
