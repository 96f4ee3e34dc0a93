"""A pinned image on this node before it runs: loaded again by digest from the store.

Intake keeps every accepted image's loadable copy (tag-free `docker save`) in the
content-addressed store under its `archive_sha256`. A node's daemon may not hold the
image (another node, an operator's `docker rmi`, a pruned disk): `ensure_image` then
streams the stored archive into the daemon while re-hashing it, and checks that the
daemon now holds exactly the pinned image id.

The archive's last bytes are held back until the digest is confirmed: bytes that no
longer match their name cut the load short (intake's copy ends with its manifest, so a
cut stream loads nothing). The daemon's own checks are not enough: it loads an archive
whose headers changed, and skips layers it already has. Whatever goes wrong here is the
platform's: `ImageUnavailable` (its message is for organisers), an INFRASTRUCTURE end for
the job, never IMAGE_INVALID.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from typing import BinaryIO

from engine.errors import Unavailable
from engine.store import CHUNK, BlobMissing, BlobStore, checked_digest
from runners.base import Runner, RunnerError

# Intake's copy ends with its manifest.json (at most ~1 MiB: bounded like the participant's)
# and the end-of-archive blocks: a stream cut anywhere before them holds no manifest, and
# the daemon loads nothing from it.
HELD_BACK = 4 << 20


class ImageUnavailable(Unavailable):
    """A pinned image this node cannot have as it was accepted; for organisers' eyes."""


class _BytesChanged(Exception):
    """Raised inside the load's stream: the stored bytes no longer hash to their name."""


def ensure_image(runner: Runner, store: BlobStore, image_id: str,
                 archive_sha256: str | None) -> bool:
    """Make the node's daemon hold `image_id`; True when it had to be loaded."""
    if runner.has_image(image_id):
        return False
    if not archive_sha256:
        raise ImageUnavailable(f"the image {image_id} is not on this node and no archive of "
                               "it was kept (accepted before the image store existed): load "
                               "it on the node by hand, or ask the team to submit again")
    _load_from_store(runner, store, image_id, archive_sha256)
    if not runner.has_image(image_id):
        raise ImageUnavailable(f"the stored archive sha256:{archive_sha256} loaded, but not "
                               f"as the image {image_id}: the database names another "
                               "image's archive")
    return True


def _load_from_store(runner: Runner, store: BlobStore, image_id: str, digest: str) -> None:
    try:
        source = store.open(digest)
    except BlobMissing:
        raise ImageUnavailable(f"the image {image_id} is not on this node and its archive "
                               f"sha256:{digest} is not in the image store (deleted, or a "
                               "store this node does not share)") from None
    with source:
        try:
            runner.load_image(_verified_chunks(source, digest))
        except _BytesChanged as exc:
            raise ImageUnavailable(f"the stored archive of the image {image_id} is "
                                   f"corrupt: {exc}; nothing was loaded. Restore it from a "
                                   "backup or ask the team to submit again") from None
        except RunnerError as exc:
            raise ImageUnavailable(f"the stored archive sha256:{digest} of the image "
                                   f"{image_id} did not load: {exc}") from None


def _verified_chunks(source: BinaryIO, digest: str) -> Iterator[bytes]:
    """The blob's chunks, sent while it is hashed; its last `HELD_BACK` bytes only once the
    whole blob hashed to its name."""
    expected = checked_digest(digest)
    hashing = hashlib.sha256()
    held: deque[bytes] = deque()
    held_bytes = 0
    while chunk := source.read(CHUNK):
        hashing.update(chunk)
        held.append(chunk)
        held_bytes += len(chunk)
        while held and held_bytes - len(held[0]) >= HELD_BACK:
            held_bytes -= len(held[0])
            yield held.popleft()
    if hashing.hexdigest() != expected:
        raise _BytesChanged(f"its bytes hash to sha256:{hashing.hexdigest()}, not to their "
                            f"name sha256:{expected}")
    yield from held
