#!/usr/bin/env bash
# Builds (once) a Debian 12 root that stands in for the image's base,
# python:3.11-slim-bookworm, which cannot be pulled on machines without a container
# registry. Used by tests/test_container.py; needs root and debootstrap.
#
#   build_base.sh [ROOT]   prints the root's path on stdout when it is ready
#
# ROOT defaults to ${VG_CONTAINER_CACHE:-~/.cache/variations-gateway}/container-base-KEY,
# KEY a hash of the package list, the host's extra CA files and this script's root
# format. The Debian mirror is the machine's own, found as the GIMP roots find theirs
# (tests/plugins/gimp/build_root.sh --mirror; $VG_DEBIAN_MIRROR overrides): no host is
# named here. Concurrent callers are serialised with flock; a root is built in a
# sibling folder and swapped in whole, so an interrupted build is never reused.
#
# What differs from the real base (the test prints it): Debian's Python 3.11.2, not the
# newest 3.11.x; Debian's pip/setuptools wheels in new venvs; the system CA store, which
# also trusts the host's extra CAs (/usr/local/share/ca-certificates: pip inside a build
# goes through the same TLS-intercepting proxy as the host, where there is one); larger.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PACKAGES=(python3 python3-venv python3-pip ca-certificates)
FORMAT=v1
MARKER=.vg-container-base-$FORMAT
SUITE=bookworm

log() { echo "build_base: $*" >&2; }

CAS=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-12)
KEY=$(printf '%s\n' "$FORMAT" "$SUITE" "${PACKAGES[@]}" "$CAS" | sha256sum | cut -c1-12)
CACHE="${VG_CONTAINER_CACHE:-$HOME/.cache/variations-gateway}"
ROOT="${1:-$CACHE/container-base-$KEY}"

if [ "$(id -u)" -ne 0 ]; then log "needs root (debootstrap, chroot)"; exit 2; fi
command -v debootstrap >/dev/null || { log "debootstrap is not installed"; exit 2; }

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9

healthy() {
  [ -f "$1/$MARKER" ] && chroot "$1" /usr/local/bin/python -c 'import venv, ensurepip, ssl' \
    >/dev/null 2>&1
}
if healthy "$ROOT"; then echo "$ROOT"; exit 0; fi

MIRROR=$(bash "$HERE/../plugins/gimp/build_root.sh" --mirror) || exit 2
log "building a Debian $SUITE root in $ROOT from $MIRROR (a minute or two, once)"
NEW="$ROOT.new"
cleanup() { mountpoint -q "$NEW/proc" 2>/dev/null && umount -l "$NEW/proc"; true; }
cleanup
rm -rf --one-file-system "$NEW"
trap cleanup EXIT
t0=$(date +%s)
debootstrap --variant=minbase "$SUITE" "$NEW" "$MIRROR" >"$NEW.debootstrap.log" 2>&1 || {
  log "debootstrap failed; last lines of $NEW.debootstrap.log:"; tail -n 20 "$NEW.debootstrap.log" >&2
  exit 1
}
cp -L /etc/resolv.conf "$NEW/etc/resolv.conf" 2>/dev/null || true
mount -t proc proc "$NEW/proc"
printf '#!/bin/sh\nexit 101\n' > "$NEW/usr/sbin/policy-rc.d"; chmod +x "$NEW/usr/sbin/policy-rc.d"
{
  chroot "$NEW" apt-get update -qq
  chroot "$NEW" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${PACKAGES[@]}"
} >"$NEW.apt.log" 2>&1 || {
  log "apt-get failed; last lines of $NEW.apt.log:"; tail -n 30 "$NEW.apt.log" >&2; exit 1
}
# The host's extra CAs, so pip and apt inside builds trust what the host trusts.
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] && cp "$crt" "$NEW/usr/local/share/ca-certificates/"
done
chroot "$NEW" update-ca-certificates >/dev/null 2>&1
# python:3.11-slim has python, python3, pip and pip3 in /usr/local/bin.
for name in python python3 pip pip3; do
  target=/usr/bin/$name; [ "$name" = python ] && target=/usr/bin/python3
  [ "$name" = pip ] && target=/usr/bin/pip3
  ln -sf "$target" "$NEW/usr/local/bin/$name"
done
chroot "$NEW" apt-get clean
rm -rf "$NEW"/var/lib/apt/lists/* "$NEW/usr/sbin/policy-rc.d" "$NEW/etc/resolv.conf"
cleanup
touch "$NEW/$MARKER"
healthy "$NEW" || { log "the new root has no working python"; exit 1; }
rm -rf --one-file-system "$ROOT"
mv "$NEW" "$ROOT"
rm -f "$NEW.debootstrap.log" "$NEW.apt.log"
trap - EXIT
log "root ready in $(( $(date +%s) - t0 )) s"
echo "$ROOT"
