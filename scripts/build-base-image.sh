#!/usr/bin/env bash
# Stand in for the Dockerfile's `FROM python:<tag>` base image where no registry is reachable.
#   scripts/build-base-image.sh [--force]
# Builds a Debian bookworm root with debootstrap (minbase + python3, python3-venv,
# ca-certificates), creates a venv at /opt/py that provides `python` and `pip` on PATH, copies
# this machine's CA bundle in (pip inside `podman build` needs it to reach PyPI, via PIP_CERT),
# and imports the root with `podman import` under the exact name the Dockerfile's FROM uses, so
# `podman build --pull=never` resolves it. Cached: does nothing when that image exists
# (unless --force). Needs root, debootstrap and podman (scripts/ensure-deps.sh podman runc
# debootstrap). Environment: MIRROR (Debian mirror), BASE_TAG (override the tag), PODMAN.
set -euo pipefail
cd "$(dirname "$0")/.."

PODMAN=${PODMAN:-podman --runtime runc --cgroup-manager=cgroupfs}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
force=0
[ "${1:-}" = "--force" ] && force=1

# The tag of the first `FROM python:<tag>` line of the Dockerfile.
tag=${BASE_TAG:-$(awk 'toupper($1) == "FROM" && $2 ~ /^(docker\.io\/library\/)?python:/ {
  sub(/^(docker\.io\/library\/)?python:/, "", $2); print $2; exit }' Dockerfile)}
if [ -z "$tag" ]; then
  echo "build-base-image: no 'FROM python:<tag>' line in Dockerfile" >&2
  exit 2
fi
image=docker.io/library/python:$tag

if [ "$force" = 0 ] && $PODMAN image exists "$image"; then
  echo "build-base-image: $image exists (cached; --force rebuilds)" >&2
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "build-base-image: needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] ||
  { echo "build-base-image: debootstrap missing: scripts/ensure-deps.sh debootstrap" >&2; exit 1; }
[ -r "$HOST_CA" ] || { echo "build-base-image: no CA bundle at $HOST_CA" >&2; exit 1; }

root=$(mktemp -d /var/tmp/base-image.XXXXXX)
# debootstrap mounts /proc (and more) inside the root while it works: unmount before removing.
unmount_all() {
  awk -v r="$root/" 'index($2 "/", r) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
cleanup() { unmount_all; rm -rf --one-file-system "$root" "$root.log"; }
trap cleanup EXIT
start=$(date +%s.%N)

echo "build-base-image: debootstrap $SUITE into $root" >&2
log=$root.log
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$root" "$MIRROR" >"$log" 2>&1; then
  tail -n 30 "$log" >&2; rm -f "$log"
  echo "build-base-image: debootstrap failed" >&2
  exit 1
fi
rm -f "$log"
unmount_all

chroot "$root" python3 -m venv /opt/py
unmount_all
# This machine's bundle (it may hold a CA that PyPI traffic is re-signed with).
install -m 0644 "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
# Smaller image: no apt lists or caches, no docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/*

tar --numeric-owner -C "$root" -c . | $PODMAN import --quiet \
  --change 'ENV PATH=/opt/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null

end=$(date +%s.%N)
awk -v s="$start" -v e="$end" -v i="$image" \
  'BEGIN { printf "build-base-image: %s built in %.1f s\n", i, e - s }' >&2
