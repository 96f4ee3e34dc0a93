#!/usr/bin/env bash
# Build the Épreuve service image (server, scorer and worker of the compose stack), offline:
#
#   images/epreuve/build.sh [--force]        (tag: $EPREUVE_IMAGE, default epreuve/epreuve:compose)
#
# On the host: the project's wheel is built from a copy of its sources, and the runtime
# dependencies of pyproject.toml (never the dev extra) are written as a requirements.txt
# whose wheels images/build.sh downloads into its cache; the image build itself has no
# network. Cached: the image carries the digest of its inputs (label org.epreuve.inputs)
# and is rebuilt only when they change.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TAG="${EPREUVE_IMAGE:-epreuve/epreuve:compose}"
PYTHON=${PYTHON:-python3}
log() { printf '[epreuve-image] %s\n' "$*" >&2; }

# What the image is made of: the packages, the project file, this folder.
inputs_digest() {
    (cd "$ROOT" && find pyproject.toml README.md engine runners gpu images/epreuve -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z \
        | xargs -0 sha256sum | sha256sum | cut -c1-32)
}

# The commit the image's provenance names (engine/BUILD_COMMIT): only a clean checkout's.
build_commit() {
    [[ -z $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null || echo dirty) ]] \
        && git -C "$ROOT" rev-parse --verify -q HEAD 2>/dev/null || true
}

commit=$(build_commit)
digest=$( (inputs_digest; echo "$commit") | sha256sum | cut -c1-32)
if [[ "${1:-}" != "--force" ]] \
   && [[ $(docker image inspect -f '{{index .Config.Labels "org.epreuve.inputs"}}' "$TAG" \
           2>/dev/null) == "$digest" ]]; then
    log "$TAG is up to date (cached); use --force to rebuild"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/epreuve-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/source" "$WORK/context/dist"
# a copy of the sources: building a wheel writes build/ and *.egg-info beside them
(cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md \
    engine runners gpu) | tar -C "$WORK/source" -xf -
log "building the project's wheel"
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$WORK/context/dist" "$WORK/source"
"$PYTHON" - "$ROOT/pyproject.toml" >"$WORK/context/requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
PY
cp "$HERE/Dockerfile" "$HERE/entrypoint" "$WORK/context/"
printf '%s\n' "$commit" >"$WORK/context/BUILD_COMMIT"
log "building $TAG (the runtime dependencies' wheels are cached on the host)"
"$ROOT/images/build.sh" "$WORK/context" "$TAG" --label "org.epreuve.inputs=$digest" >/dev/null
log "built $TAG: $(docker image inspect -f '{{.Id}} {{.Size}}' "$TAG")"
