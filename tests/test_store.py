"""The content-addressed store: names are digests of the bytes, writes are atomic."""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import pytest

from engine.store import BlobCorrupt, BlobMissing, BlobTooLarge, DirectoryStore


def test_a_blob_is_named_by_the_sha256_of_its_bytes(tmp_path):
    store = DirectoryStore(tmp_path)
    data = b"image bytes" * 1000
    blob = store.put(io.BytesIO(data))
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert blob.size == len(data)
    assert store.has(blob.sha256) and store.size(blob.sha256) == len(data)
    with store.open(blob.sha256) as handle:
        assert handle.read() == data
    assert list(store.digests()) == [blob.sha256]
    assert store.verify(blob.sha256)


def test_the_same_bytes_twice_are_one_blob(tmp_path):
    store = DirectoryStore(tmp_path)
    first = store.put(io.BytesIO(b"same"))
    second = store.put(io.BytesIO(b"same"))
    assert first == second and list(store.digests()) == [first.sha256]
    assert list((tmp_path / "incoming").iterdir()) == []


def test_an_expected_digest_not_met_stores_nothing(tmp_path):
    store = DirectoryStore(tmp_path)
    with pytest.raises(BlobCorrupt):
        store.put(io.BytesIO(b"these bytes"), expected_sha256="0" * 64)
    assert list(store.digests()) == []
    assert list((tmp_path / "incoming").iterdir()) == []


def test_a_stream_over_its_cap_stores_nothing(tmp_path):
    store = DirectoryStore(tmp_path)
    with pytest.raises(BlobTooLarge):
        store.put(io.BytesIO(b"x" * 5000), max_bytes=4096)
    assert list(store.digests()) == []


@pytest.mark.parametrize("name", ["../../etc/passwd", "sha256:../x", "ABC", "", "a" * 63])
def test_a_name_that_is_not_a_digest_never_becomes_a_path(tmp_path, name):
    store = DirectoryStore(tmp_path)
    assert not store.has(name)
    with pytest.raises(BlobMissing):
        store.open(name)


def test_bytes_changed_on_disk_fail_verification(tmp_path):
    store = DirectoryStore(tmp_path)
    blob = store.put(io.BytesIO(b"original"))
    path = store.path(blob.sha256)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    assert not store.verify(blob.sha256)
    store.delete(blob.sha256)
    assert not store.has(blob.sha256) and not store.verify(blob.sha256)


def test_an_adopted_file_is_moved_in_without_a_copy(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    written = tmp_path / "copy.tar"
    written.write_bytes(b"intake's copy")
    inode = written.stat().st_ino
    blob = store.adopt(written, hashlib.sha256(b"intake's copy").hexdigest())
    assert not written.exists() and store.path(blob.sha256).stat().st_ino == inode


def test_an_adopted_file_on_another_file_system_is_copied_and_checked(tmp_path):
    """The copy may be written on another file system than the store's (a rename fails
    there): its bytes are copied in, hashed again against the digest given."""
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or elsewhere.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to write on")
    store = DirectoryStore(tmp_path / "store")
    written = Path(tempfile.mkstemp(dir=elsewhere)[1])
    written.write_bytes(b"intake's copy")
    blob = store.adopt(written, hashlib.sha256(b"intake's copy").hexdigest())
    assert not written.exists() and store.verify(blob.sha256)
    lying = Path(tempfile.mkstemp(dir=elsewhere)[1])
    lying.write_bytes(b"other bytes")
    with pytest.raises(BlobCorrupt):
        store.adopt(lying, "0" * 64)
    assert not lying.exists() and list(store.digests()) == [blob.sha256]
