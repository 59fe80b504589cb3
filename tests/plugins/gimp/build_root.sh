#!/usr/bin/env bash
# Builds (once) and checks a Debian 13 (trixie) root with GIMP 3 and its Python, used by
# tests/plugins/test_gimp_e2e.py and scripts/gimp-screenshot.sh to run real GIMP 3
# headless on a Debian 12 host. Needs root and debootstrap.
#
#   build_root.sh [ROOT]         prints the root's path on stdout when it is ready
#
# ROOT defaults to $VG_GIMP_ROOT, else ~/.cache/variations-gateway/gimp-root. The root is
# cached: a ready root (marker file + a working gimp-console-3.0) costs nothing; a missing
# or broken one is rebuilt from scratch in a sibling folder and swapped in atomically.
# Concurrent callers are serialised with flock.
set -euo pipefail

ROOT="${1:-${VG_GIMP_ROOT:-$HOME/.cache/variations-gateway/gimp-root}}"
MIRROR="${VG_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
# gimp + python3 run plug-ins; python3-gi/gir1.2-gtk-3.0 come with gimp's Python support;
# xvfb/xauth give a virtual display for the dialog screenshot; x11-apps brings xwd.
PACKAGES=(gimp python3 python3-gi xvfb xauth x11-apps)
MARKER=.vg-gimp-root-v1

log() { echo "build_root: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "needs root (chroot, mount, debootstrap)"; exit 2
fi
command -v debootstrap >/dev/null || { log "debootstrap is not installed"; exit 2; }

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9

# Unmount everything this script (or an interrupted test) may have left mounted in $1.
unmount_all() {
  local r="$1" m
  [ -d "$r" ] || return 0
  for m in dev/shm dev/pts proc sys; do
    if mountpoint -q "$r/$m" 2>/dev/null; then umount -l "$r/$m" || true; fi
  done
}

healthy() {
  local r="$1"
  [ -f "$r/$MARKER" ] && [ -x "$r/usr/bin/gimp-console-3.0" ] && [ -x "$r/usr/bin/python3" ] \
    || return 1
  # Cheap run-time check: the binary and Python's GObject bindings load.
  chroot "$r" /usr/bin/gimp-console-3.0 --version >/dev/null 2>&1 || return 1
  chroot "$r" /usr/bin/python3 -c 'import gi; gi.require_version("Gegl", "0.4")' \
    >/dev/null 2>&1 || return 1
}

if healthy "$ROOT"; then
  echo "$ROOT"; exit 0
fi

log "building a Debian $SUITE root with GIMP 3 in $ROOT (a few minutes, once)"
NEW="$ROOT.new"
unmount_all "$NEW"
rm -rf --one-file-system "$NEW"
trap 'unmount_all "$NEW"' EXIT
t0=$(date +%s)
debootstrap --variant=minbase "$SUITE" "$NEW" "$MIRROR" >"$NEW.debootstrap.log" 2>&1 || {
  log "debootstrap failed; last lines of $NEW.debootstrap.log:"; tail -n 20 "$NEW.debootstrap.log" >&2
  exit 1
}
log "debootstrap done in $(( $(date +%s) - t0 )) s"
cp -L /etc/resolv.conf "$NEW/etc/resolv.conf" 2>/dev/null || true
mount -t proc proc "$NEW/proc"
# No daemons start inside the root.
printf '#!/bin/sh\nexit 101\n' > "$NEW/usr/sbin/policy-rc.d"; chmod +x "$NEW/usr/sbin/policy-rc.d"
chroot "$NEW" apt-get update -qq
chroot "$NEW" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  --no-install-recommends "${PACKAGES[@]}" >"$NEW.apt.log" 2>&1 || {
  log "apt-get install failed; last lines of $NEW.apt.log:"; tail -n 30 "$NEW.apt.log" >&2
  exit 1
}
chroot "$NEW" apt-get clean
unmount_all "$NEW"
touch "$NEW/$MARKER"
healthy "$NEW" || { log "the new root does not run gimp-console-3.0"; exit 1; }

unmount_all "$ROOT"
rm -rf --one-file-system "$ROOT"
mv "$NEW" "$ROOT"
rm -f "$NEW.debootstrap.log" "$NEW.apt.log"
trap - EXIT
log "root ready in $(( $(date +%s) - t0 )) s"
echo "$ROOT"
