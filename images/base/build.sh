#!/usr/bin/env bash
# Build the offline Python 3.11 base image that every Épreuve image starts FROM.
#
#   images/base/build.sh [--force]
#
# Order of preference:
#   1. the tag already exists            -> nothing to do (cached)
#   2. python:3.11-slim-bookworm is local -> tag it (a machine with a registry
#      can `docker pull` it first, or set EPREUVE_BASE_PULL=1)
#   3. otherwise debootstrap Debian bookworm (Python 3.11) from this machine's
#      own apt sources and `docker import` the root file system.
# The mirror is read from the system's apt configuration, never written here.
set -euo pipefail

TAG="${EPREUVE_BASE_IMAGE:-epreuve/base:3.11}"
REGISTRY_IMAGE=python:3.11-slim-bookworm
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { printf '[base-image] %s\n' "$*" >&2; }
# shellcheck source=../lib/debootstrap.sh
source "$(dirname "$0")/../lib/debootstrap.sh"

if [[ $FORCE == 0 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already exists (cached); use --force to rebuild"
    exit 0
fi

if [[ "${EPREUVE_BASE_PULL:-0}" == 1 ]]; then
    docker pull "$REGISTRY_IMAGE" || log "pull of $REGISTRY_IMAGE failed; building offline"
fi
if docker image inspect "$REGISTRY_IMAGE" >/dev/null 2>&1; then
    docker tag "$REGISTRY_IMAGE" "$TAG"
    log "tagged local $REGISTRY_IMAGE as $TAG"
    exit 0
fi

WORK=$(mktemp -d /var/tmp/epreuve-base.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
debootstrap_rootfs "$ROOTFS" python3,python3-pip,python3-venv,ca-certificates
slim_rootfs "$ROOTFS"
ln -sf python3 "$ROOTFS/usr/bin/python"   # `python` like the official image

log "importing as $TAG"
import_rootfs "$ROOTFS" "$TAG" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV PIP_NO_CACHE_DIR=1' \
    --change 'LABEL org.epreuve.base=debootstrap-bookworm' \
    --change 'CMD ["python3"]'
