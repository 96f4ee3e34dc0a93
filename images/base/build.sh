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
SUITE=bookworm                      # Debian release whose python3 is 3.11
REGISTRY_IMAGE=python:3.11-slim-bookworm
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { printf '[base-image] %s\n' "$*" >&2; }

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

# The first Debian archive URI of this machine's apt sources (deb822 or legacy).
apt_mirror() {
    local uri=""
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources \
              | grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' \
              /etc/apt/sources.list || true)
    fi
    printf '%s' "$uri"
}

if ! command -v debootstrap >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    else
        log "debootstrap is missing and no registry image is available; install debootstrap or pull $REGISTRY_IMAGE"
        exit 1
    fi
fi

MIRROR=$(apt_mirror)
if [[ -z "$MIRROR" ]]; then
    log "no Debian mirror found in /etc/apt/sources.list{,.d}; cannot build offline"
    exit 1
fi

WORK=$(mktemp -d /var/tmp/epreuve-base.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
log "debootstrap $SUITE from the machine's apt mirror into $ROOTFS (a few minutes)"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

# Slim the tree: no apt lists or caches, no docs; `python` like the official image.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
ln -sf python3 "$ROOTFS/usr/bin/python"
: >"$ROOTFS/etc/apt/sources.list"   # the image never reaches a network

log "importing as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV PIP_NO_CACHE_DIR=1' \
    --change 'LABEL org.epreuve.base=debootstrap-bookworm' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
log "built $TAG: $(docker image inspect -f '{{.Id}} {{.Size}}' "$TAG")"
