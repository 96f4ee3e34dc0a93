#!/usr/bin/env bash
# Build an image from a directory of ours, offline, writing nothing into that directory:
#
#   images/build.sh DIR TAG [--target STAGE]
#
# The base image comes first (images/base/build.sh, cached). The build context is a
# temporary copy of DIR. If DIR holds a requirements.txt, its wheels are downloaded here
# on the host (containers have no network) into a cache outside the source tree, keyed by
# the requirements' digest (EPREUVE_WHEEL_CACHE, default ~/.cache/epreuve/wheels), and
# copied into the context's wheels/; the Dockerfile installs them with
# `pip install --no-index --find-links wheels`. The build itself runs with --network none.
# BASE_IMAGE (default epreuve/base:3.11) is passed as a build arg, so
# `BASE_IMAGE=python:3.11-slim-bookworm images/build.sh ...` works wherever a registry does.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${1:?usage: images/build.sh DIR TAG [--target STAGE]}
TAG=${2:?usage: images/build.sh DIR TAG [--target STAGE]}
shift 2
BASE_IMAGE=${BASE_IMAGE:-epreuve/base:3.11}
PYTHON=${PYTHON:-python3}
WHEEL_CACHE=${EPREUVE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/epreuve/wheels}

if [[ "$BASE_IMAGE" == epreuve/base:* ]]; then
    EPREUVE_BASE_IMAGE="$BASE_IMAGE" "$HERE/base/build.sh"
fi

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/epreuve-build.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
# the context, without any wheels/ an older build left in the source tree
tar -C "$DIR" --exclude=./wheels -cf - . | tar -C "$CONTEXT" -xf -

if [[ -f "$DIR/requirements.txt" ]]; then
    # Wheels for the image's Python (3.11) and platform, whatever the host runs.
    arch=$(uname -m)
    digest=$(sha256sum < "$DIR/requirements.txt" | cut -c1-16)
    wheels="$WHEEL_CACHE/$arch-$digest"
    if [[ ! -d "$wheels" ]]; then  # filled aside, then renamed: concurrent builds never
        mkdir -p "$WHEEL_CACHE"    # see a half-downloaded set
        partial=$(mktemp -d "$WHEEL_CACHE/.partial.XXXXXX")
        "$PYTHON" -m pip download -q --only-binary=:all: --dest "$partial" \
            --python-version 3.11 --implementation cp --abi cp311 \
            --platform "manylinux2014_${arch}" --platform "manylinux_2_28_${arch}" \
            --platform "manylinux_2_17_${arch}" --platform any \
            -r "$DIR/requirements.txt"
        mv -T "$partial" "$wheels" 2>/dev/null || rm -rf "$partial"
    fi
    mkdir -p "$CONTEXT/wheels"
    cp -l "$wheels"/*.whl "$CONTEXT/wheels/" 2>/dev/null || cp "$wheels"/*.whl "$CONTEXT/wheels/"
fi

# The legacy builder: no buildx plugin needed, and --network none applies to RUN steps.
DOCKER_BUILDKIT=0 docker build --network none -q \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$TAG" "$@" "$CONTEXT" \
    2> >(grep -v -e DEPRECATED -e 'legacy builder' -e BuildKit -e 'environment-variable' >&2) >/dev/null
echo "$TAG"
