#!/usr/bin/env bash
# Build the PostgreSQL image of the compose stack from Debian's `postgresql` package,
# offline (debootstrap from this machine's apt sources; no registry):
#
#   images/postgres/build.sh [--force]        (tag: $EPREUVE_POSTGRES_IMAGE, epreuve/postgres:15)
#
# Cached: an existing tag is kept unless --force. The server runs as the `postgres` user;
# its data is /var/lib/postgresql/data (a volume); `entrypoint` creates the cluster once.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TAG="${EPREUVE_POSTGRES_IMAGE:-epreuve/postgres:15}"
log() { printf '[postgres-image] %s\n' "$*" >&2; }
# shellcheck source=../lib/debootstrap.sh
source "$HERE/../lib/debootstrap.sh"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already exists (cached); use --force to rebuild"
    exit 0
fi

WORK=$(mktemp -d /var/tmp/epreuve-postgres.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
debootstrap_rootfs "$ROOTFS" postgresql
slim_rootfs "$ROOTFS"
# The package's own cluster (main) is not used: the entrypoint makes one in the volume.
rm -rf "$ROOTFS"/var/lib/postgresql/[0-9]* "$ROOTFS"/etc/postgresql/[0-9]*
bin=$(cd "$ROOTFS" && ls -d usr/lib/postgresql/*/bin | sort -V | tail -n1)
install -m 0755 "$HERE/entrypoint" "$ROOTFS/usr/local/bin/epreuve-postgres"
install -d -m 0700 "$ROOTFS/var/lib/postgresql/data"
chroot "$ROOTFS" chown postgres:postgres /var/lib/postgresql/data

import_rootfs "$ROOTFS" "$TAG" \
    --change "ENV PATH=/$bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change 'LABEL org.epreuve.service=postgres' \
    --change 'USER postgres' \
    --change 'VOLUME /var/lib/postgresql/data' \
    --change 'EXPOSE 5432' \
    --change 'ENTRYPOINT ["/usr/local/bin/epreuve-postgres"]'
