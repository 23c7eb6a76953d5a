#!/usr/bin/env bash
# A base image for docker/Dockerfile made from Debian's packages alone, for machines that reach a
# Debian mirror but no container registry: debootstrap (minbase) with python3, its venv module,
# pip and the CA certificates, committed with buildah. Prints the image's name on stdout.
#
#   docker/base-image.sh            # -> localhost/soho-base:bookworm
#
# DEBIAN_MIRROR (default http://deb.debian.org/debian) and SUITE (default bookworm: Python 3.11).
# Needs root, debootstrap and buildah (all from Debian's packages). About a minute.
set -euo pipefail
suite=${SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
name=localhost/soho-base:$suite

if buildah inspect --type image "$name" >/dev/null 2>&1; then
  echo "$name"
  exit 0
fi
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "docker/base-image.sh: needs $tool (apt-get install $tool)" >&2; exit 1; }
done
root=$(mktemp -d)
container=""
cleanup() { [ -n "$container" ] && buildah rm "$container" >/dev/null 2>&1; rm -rf "$root"; }
trap cleanup EXIT

echo "docker/base-image.sh: debootstrap $suite from $mirror" >&2
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  "$suite" "$root" "$mirror" >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
container=$(buildah from scratch)
buildah copy --quiet "$container" "$root" / >/dev/null
buildah config --env LANG=C.UTF-8 --cmd /bin/bash \
  --label org.opencontainers.image.description="Debian $suite minbase with python3, made by docker/base-image.sh" \
  "$container"
buildah commit --quiet "$container" "$name" >/dev/null
echo "$name"
