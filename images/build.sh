#!/usr/bin/env bash
# Build an image from a directory of ours, offline:
#
#   images/build.sh DIR TAG [--target STAGE]
#
# The base image comes first (images/base/build.sh, cached). If DIR holds a
# requirements.txt, its wheels are downloaded here on the host into DIR/wheels
# (containers have no network), and the Dockerfile installs them with
# `pip install --no-index --find-links wheels`. The build itself runs with
# --network none. BASE_IMAGE (default epreuve/base:3.11) is passed as a build
# arg, so `BASE_IMAGE=python:3.11-slim-bookworm images/build.sh ...` works
# wherever a registry does.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${1:?usage: images/build.sh DIR TAG [--target STAGE]}
TAG=${2:?usage: images/build.sh DIR TAG [--target STAGE]}
shift 2
BASE_IMAGE=${BASE_IMAGE:-epreuve/base:3.11}
PYTHON=${PYTHON:-python3}

if [[ "$BASE_IMAGE" == epreuve/base:* ]]; then
    EPREUVE_BASE_IMAGE="$BASE_IMAGE" "$HERE/base/build.sh"
fi

if [[ -f "$DIR/requirements.txt" ]]; then
    mkdir -p "$DIR/wheels"
    # Wheels for the image's Python (3.11) and platform, whatever the host runs.
    arch=$(uname -m)
    "$PYTHON" -m pip download -q --only-binary=:all: --dest "$DIR/wheels" \
        --python-version 3.11 --implementation cp --abi cp311 \
        --platform "manylinux2014_${arch}" --platform "manylinux_2_28_${arch}" \
        --platform "manylinux_2_17_${arch}" --platform any \
        -r "$DIR/requirements.txt"
fi

# The legacy builder: no buildx plugin needed, and --network none applies to RUN steps.
DOCKER_BUILDKIT=0 docker build --network none -q \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$TAG" "$@" "$DIR" \
    2> >(grep -v -e DEPRECATED -e 'legacy builder' -e BuildKit -e 'environment-variable' >&2) >/dev/null
echo "$TAG"
