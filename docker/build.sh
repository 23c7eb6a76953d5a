#!/usr/bin/env bash
# Builds the SOHO image: `make image` (CPU torch) or `make image-cuda` (PyPI's CUDA torch).
#
#   docker/build.sh cpu|cuda
#
# With docker when a Docker engine answers, otherwise with buildah (`--isolation chroot`: no
# engine, no daemon, no privileges beyond root). Settings, all optional, from the environment:
#   IMAGE            the reference to tag (default ghcr.io/soho-kubeflow/soho:<version>[-cpu])
#   BASE_IMAGE       the base (default python:3.11.13-slim-bookworm; where no registry answers,
#                    one made from Debian's packages by docker/base-image.sh)
#   TORCH_INDEX_URL  where torch comes from (default: PyTorch's CPU index for cpu, PyPI for
#                    cuda; empty = PyPI). An unreachable CPU index falls back to PyPI, saying so.
#   CA_BUNDLE        a CA bundle for pip behind a TLS-re-signing proxy (default: the host's
#                    /etc/ssl/certs/ca-certificates.crt); a build secret, not kept in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

variant=${1:-cpu}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
case $variant in
  cpu)  image=${IMAGE:-ghcr.io/soho-kubeflow/soho:$version-cpu}
        index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu} ;;
  cuda) image=${IMAGE:-ghcr.io/soho-kubeflow/soho:$version}
        index=${TORCH_INDEX_URL-} ;;
  *)    echo "docker/build.sh: unknown variant '$variant' (cpu or cuda)" >&2; exit 2 ;;
esac
base=${BASE_IMAGE:-python:3.11.13-slim-bookworm}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if [ -n "$index" ] && ! curl -fsS -m 20 -o /dev/null "$index/torch/" 2>/dev/null; then
  echo "docker/build.sh: $index does not answer; torch comes from PyPI (a CUDA build: a larger image)"
  index=""
fi

args=(-f docker/Dockerfile -t "$image" --build-arg "TORCH_INDEX_URL=$index")
[ -s "$ca" ] && args+=(--secret "id=ca,src=$ca")

start=$(date +%s)
if docker info >/dev/null 2>&1; then
  echo "docker/build.sh: building $image with docker over $base"
  DOCKER_BUILDKIT=1 docker build "${args[@]}" --build-arg "BASE_IMAGE=$base" .
  size="$(( $(docker image inspect -f '{{.Size}}' "$image") / 1000000 )) MB"
elif command -v buildah >/dev/null; then
  if [ -z "${BASE_IMAGE:-}" ] && ! buildah inspect --type image "$base" >/dev/null 2>&1 \
     && ! buildah pull -q "docker.io/library/$base" >/dev/null 2>&1; then
    echo "docker/build.sh: no registry answers for $base; using a base made from Debian's packages"
    base=$(docker/base-image.sh)
  fi
  echo "docker/build.sh: building $image with buildah over $base"
  buildah bud --isolation chroot --layers "${args[@]}" --build-arg "BASE_IMAGE=$base" .
  size=$(buildah images --format '{{.Size}}' "$image" | head -n 1)
else
  echo "docker/build.sh: neither a Docker engine nor buildah is available (apt-get install buildah)" >&2
  exit 1
fi
echo "docker/build.sh: built $image in $(( $(date +%s) - start )) s, $size"
echo "docker/build.sh: earlier builds' layers stay as a cache; \`buildah rmi --prune\` (or \`docker image prune\`) frees them"
