# Shared by the images built from Debian's packages without a registry (sourced, not run):
# the base image (images/base/build.sh) and the service images (images/postgres,
# images/prometheus). The mirror is read from this machine's apt configuration, never
# written in the repository.

DEBIAN_SUITE=bookworm   # the release whose python3 is 3.11, postgresql 15, prometheus 2.42

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

# debootstrap itself, installed from Debian when missing (as root).
ensure_debootstrap() {
    command -v debootstrap >/dev/null && return
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    else
        log "debootstrap is missing: install it (as root: apt-get install debootstrap)"
        exit 1
    fi
}

# debootstrap_rootfs ROOTFS PACKAGES: a minimal Debian tree with PACKAGES (comma separated)
# and what they depend on, from the machine's own mirror; its log beside ROOTFS.
debootstrap_rootfs() {
    local rootfs=$1 packages=$2 mirror
    ensure_debootstrap
    mirror=$(apt_mirror)
    if [[ -z "$mirror" ]]; then
        log "no Debian mirror found in /etc/apt/sources.list{,.d}; cannot build offline"
        exit 1
    fi
    log "debootstrap $DEBIAN_SUITE with $packages into $rootfs (a few minutes)"
    debootstrap --variant=minbase --include="$packages" "$DEBIAN_SUITE" "$rootfs" "$mirror" \
        >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
}

# No apt lists or caches, no docs, and no sources: the image never reaches a network.
slim_rootfs() {
    local rootfs=$1
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
           "$rootfs"/var/cache/apt/archives/*.deb \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    : >"$rootfs/etc/apt/sources.list"
}

# import_rootfs ROOTFS TAG [--change ...]: the tree as a one-layer image.
import_rootfs() {
    local rootfs=$1 tag=$2
    shift 2
    tar --numeric-owner -C "$rootfs" -c . | docker import "$@" - "$tag" >/dev/null
    log "built $tag: $(docker image inspect -f '{{.Id}} {{.Size}}' "$tag")"
}
