#!/usr/bin/env bash
# Build the Prometheus image of the compose stack from Debian's `prometheus` package,
# offline (debootstrap from this machine's apt sources; no registry):
#
#   images/prometheus/build.sh [--force]    (tag: $EPREUVE_PROMETHEUS_IMAGE, epreuve/prometheus:2)
#
# Cached: an existing tag is kept unless --force. Runs as the `prometheus` user; its
# configuration is mounted at /etc/prometheus (deploy/prometheus), its data is a volume.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TAG="${EPREUVE_PROMETHEUS_IMAGE:-epreuve/prometheus:2}"
log() { printf '[prometheus-image] %s\n' "$*" >&2; }
# shellcheck source=../lib/debootstrap.sh
source "$HERE/../lib/debootstrap.sh"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already exists (cached); use --force to rebuild"
    exit 0
fi

WORK=$(mktemp -d /var/tmp/epreuve-prometheus.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
debootstrap_rootfs "$ROOTFS" prometheus
slim_rootfs "$ROOTFS"
rm -rf "$ROOTFS"/etc/prometheus/*   # the package's example config: ours is mounted here
install -d -m 0755 "$ROOTFS/var/lib/prometheus/data"
chroot "$ROOTFS" chown prometheus:prometheus /var/lib/prometheus/data

import_rootfs "$ROOTFS" "$TAG" \
    --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'LABEL org.epreuve.service=prometheus' \
    --change 'USER prometheus' \
    --change 'VOLUME /var/lib/prometheus/data' \
    --change 'EXPOSE 9090' \
    --change 'ENTRYPOINT ["/usr/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus/data", "--web.listen-address=:9090"]'
