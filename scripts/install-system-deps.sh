#!/usr/bin/env bash
# Installs the real components the test suite runs against, when they are missing.
# Debian packages only; needs root (CI runs as root). Idempotent and quiet when done.
set -euo pipefail

want=()
need() { command -v "$1" >/dev/null 2>&1 || want+=("$2"); }
need redis-server redis-server
need prometheus prometheus
need promtool prometheus
need nginx nginx
need wrk wrk
need debootstrap debootstrap
need systemd-analyze systemd
# PostgreSQL's server binaries live outside PATH (tests/postgres_server.py finds them).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || want+=(postgresql)
# tests/test_container.py: rootful podman builds and runs the image (Docker format, for
# its HEALTHCHECK), podman-compose runs the replicas on a CNI network whose dnsname
# plugin (with dnsmasq) resolves service names; runc/fuse-overlayfs/slirp4netns/uidmap:
# what podman needs on these VMs (docs/deploy.md#podman).
need podman podman
need buildah buildah
need podman-compose podman-compose
need runc runc
need fuse-overlayfs fuse-overlayfs
need slirp4netns slirp4netns
need newuidmap uidmap
need /usr/lib/cni/dnsname golang-github-containernetworking-plugin-dnsname
need dnsmasq dnsmasq-base

if [ ${#want[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: need root to install: ${want[*]}" >&2
  [ "${CI:-}" = "true" ] && exit 1
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps CI fast; policy-rc.d stops the packages' own daemons
# from starting: the tests start their own instances on free loopback ports.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${want[@]}" | sort -u) >/dev/null
