#!/usr/bin/env bash
# Builds (once) and checks a Debian root with GIMP 3 and its Python, used by
# tests/plugins/test_gimp_e2e.py and scripts/gimp-screenshot.sh to run real GIMP 3
# headless on a Debian 12 host (whose own GIMP is 2.10). Needs root and debootstrap.
#
#   build_root.sh [SUITE [ROOT]]   prints the root's path on stdout when it is ready
#   build_root.sh --mirror         prints the Debian mirror it would use, and exits
#
# SUITE: trixie (Debian 13, GIMP 3.0; the default, also $VG_GIMP_SUITE) or sid (the
# newest GIMP 3.x Debian ships). ROOT defaults to a folder in the cache,
# ${VG_GIMP_CACHE:-~/.cache/variations-gateway}/gimp-root-SUITE-KEY, where KEY is a hash of
# the suite, the package list and this script's root format: changing any of them builds
# a new root instead of reusing one made for something else.
#
# The Debian mirror is the machine's own: the first non-security URIs: line of
# /etc/apt/sources.list.d/*.sources, else the first `deb` line of /etc/apt/sources.list
# ($VG_DEBIAN_MIRROR overrides; $VG_APT_ETC replaces /etc/apt for tests). No host is
# named here.
#
# The root is cached: a ready root (marker file + a working gimp-console-3) costs nothing;
# a root of a rolling suite (sid) older than $VG_GIMP_ROOT_MAX_DAYS (default 30) days, so
# perhaps no longer the newest GIMP, a missing or a broken one is rebuilt from scratch in a sibling folder and swapped in
# atomically. Concurrent callers for the same root are serialised with flock.
set -euo pipefail
APT_ETC="${VG_APT_ETC:-/etc/apt}"

SUITE="${1:-${VG_GIMP_SUITE:-trixie}}"
# gimp + python3 run plug-ins; python3-gi/gir1.2-gtk-3.0 come with gimp's Python support;
# xvfb/xauth give a virtual display for the dialog screenshot; x11-apps brings xwd.
PACKAGES=(gimp python3 python3-gi xvfb xauth x11-apps)
FORMAT=v2
MARKER=.vg-gimp-root-$FORMAT
# sid's Release file on a snapshot mirror may be past its Valid-Until date.
APT_OPTS=(-o Acquire::Check-Valid-Until=false)

log() { echo "build_root: $*" >&2; }

KEY=$(printf '%s\n' "$FORMAT" "$SUITE" "${PACKAGES[@]}" | sha256sum | cut -c1-12)
CACHE="${VG_GIMP_CACHE:-$HOME/.cache/variations-gateway}"
ROOT="${2:-$CACHE/gimp-root-$SUITE-$KEY}"

# The machine's own Debian mirror, from its apt sources (deb822 first, then one-line).
host_mirror() {
  local f uri
  for f in "$APT_ETC"/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # Stanzas are separated by blank lines; take URIs: of the first stanza whose types
    # include deb and whose suites and URI are not the security archive.
    uri=$(awk '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^[ \t]*#/) continue
          if (match(line, /^[Tt]ypes:[ \t]*/)) types = substr(line, RLENGTH + 1)
          else if (match(line, /^URIs:[ \t]*/)) uris = substr(line, RLENGTH + 1)
          else if (match(line, /^[Ss]uites:[ \t]*/)) suites = substr(line, RLENGTH + 1)
          else if (match(line, /^[Ee]nabled:[ \t]*/)) enabled = substr(line, RLENGTH + 1)
        }
        if (enabled ~ /^no/ || types !~ /(^|[ \t])deb([ \t]|$)/) next
        if (suites ~ /security/ || uris ~ /security/) next
        split(uris, u, /[ \t]+/)
        if (u[1] != "") { print u[1]; exit }
      }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  done
  if [ -f "$APT_ETC/sources.list" ]; then
    # deb [options] URI suite components...
    uri=$(sed -E 's/\[[^]]*\]//' "$APT_ETC/sources.list" \
      | awk '$1 == "deb" && $2 !~ /security/ && $3 !~ /security/ { print $2; exit }')
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  fi
  return 1
}

debian_mirror() {
  if [ -n "${VG_DEBIAN_MIRROR:-}" ]; then echo "$VG_DEBIAN_MIRROR"; return 0; fi
  host_mirror || {
    log "no Debian mirror in $APT_ETC/sources.list.d/*.sources or $APT_ETC/sources.list;"
    log "set VG_DEBIAN_MIRROR to one"; return 2
  }
}

if [ "$SUITE" = --mirror ]; then
  debian_mirror; exit
fi
case "$SUITE" in
  trixie|sid|forky|unstable|testing) ;;
  *) log "unknown suite '$SUITE' (trixie for GIMP 3.0, sid for the newest 3.x)"; exit 2 ;;
esac

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
  [ -f "$r/$MARKER" ] && [ -x "$r/usr/bin/gimp-console-3" ] && [ -x "$r/usr/bin/python3" ] \
    || return 1
  if [ "$SUITE" != trixie ] \
      && [ -z "$(find "$r/$MARKER" -mtime "-${VG_GIMP_ROOT_MAX_DAYS:-30}")" ]; then
    log "the $SUITE root is over ${VG_GIMP_ROOT_MAX_DAYS:-30} days old: rebuilding it"
    return 1
  fi
  # Cheap run-time check: the binary and Python's GObject bindings load.
  chroot "$r" /usr/bin/gimp-console-3 --version >/dev/null 2>&1 || return 1
  chroot "$r" /usr/bin/python3 -c 'import gi; gi.require_version("Gegl", "0.4")' \
    >/dev/null 2>&1 || return 1
}

if healthy "$ROOT"; then
  echo "$ROOT"; exit 0
fi

MIRROR=$(debian_mirror) || exit 2

log "building a Debian $SUITE root with GIMP 3 in $ROOT from $MIRROR (a few minutes, once)"
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
chroot "$NEW" apt-get "${APT_OPTS[@]}" update -qq >"$NEW.apt.log" 2>&1 || {
  log "apt-get update failed; last lines of $NEW.apt.log:"; tail -n 30 "$NEW.apt.log" >&2
  exit 1
}
chroot "$NEW" env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -qq \
  --no-install-recommends "${PACKAGES[@]}" >>"$NEW.apt.log" 2>&1 || {
  log "apt-get install failed; last lines of $NEW.apt.log:"; tail -n 30 "$NEW.apt.log" >&2
  exit 1
}
chroot "$NEW" apt-get clean
unmount_all "$NEW"
touch "$NEW/$MARKER"
healthy "$NEW" || { log "the new root does not run gimp-console-3"; exit 1; }

unmount_all "$ROOT"
rm -rf --one-file-system "$ROOT"
mv "$NEW" "$ROOT"
rm -f "$NEW.debootstrap.log" "$NEW.apt.log"
trap - EXIT
log "$SUITE root ready in $(( $(date +%s) - t0 )) s: $(chroot "$ROOT" gimp-console-3 --version 2>/dev/null)"
echo "$ROOT"
