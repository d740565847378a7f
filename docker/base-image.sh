#!/usr/bin/env bash
# Build a local stand-in for the registry image `debian:bookworm-slim` with debootstrap, for hosts that cannot
# pull from a registry. Needs root, a running Docker engine, and debootstrap (`apt-get install debootstrap`):
#
#   bash docker/base-image.sh          # as root (or with sudo: sudo bash docker/base-image.sh)
#   MIRROR=http://deb.debian.org/debian TAG=debian:bookworm-slim bash docker/base-image.sh
#
# The result mirrors what the official slim image trims: no docs, man pages or locales, apt lists removed.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=${SUITE:-bookworm}
TAG=${TAG:-debian:bookworm-slim}
DOCKER=${DOCKER:-docker}

fail() {
  printf 'base-image.sh: %s\n' "$*" >&2
  exit 1
}
[ "$(id -u)" = 0 ] || fail "debootstrap needs root: run this as root (or: sudo bash docker/base-image.sh)"
command -v debootstrap >/dev/null || fail "debootstrap not found: install it first (as root: apt-get install debootstrap)"
"$DOCKER" info >/dev/null 2>&1 || fail "no Docker engine answers through '$DOCKER': start dockerd first"

rootfs=$(mktemp -d /tmp/rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR"

cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# What the official slim images exclude from every later package install, and their apt hygiene.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"

find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/{man,info,locale,groff,lintian}/* \
  "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
  "$rootfs"/var/cache/debconf/*-old

tar -C "$rootfs" --numeric-owner -c . |
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$TAG"
"$DOCKER" image ls "$TAG"
