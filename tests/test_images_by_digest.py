"""Images kept by digest: intake keeps each accepted image's loadable copy in the
content-addressed store, and a node whose daemon lost the image loads it back by digest
before the run. Whatever goes wrong there is the platform's, never the team's.

Real Docker throughout: each test builds its own small image (a unique label on top of
the threshold example, or of the offline base) and removes only what it built.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from pathlib import Path

import docker
import pytest
from sqlalchemy import select

from engine.db.models import CaseResultRow, ImageRow, JobRow, SubmissionRow
from engine.image_presence import ImageUnavailable, ensure_image
from engine.images import ImageInvalid, pin_tar
from engine.store import DirectoryStore, open_store
from engine.submissions import register_challenge, submit
from engine.worker.protocol import messages_platform
from runners.docker import DockerRunner
from tests.conftest import REPO, build_image
from tests.engine_fixtures import make_scene, pin
from tests.test_platform_failures import assert_failed_by_the_platform, worker_for

pytestmark = pytest.mark.docker

CLIENT_URL = "unix:///var/run/docker.sock"


@pytest.fixture(scope="module")
def threshold(docker_engine):
    return build_image(REPO / "images/examples/threshold", "epreuve-example/threshold:latest")


@pytest.fixture
def client(docker_engine):
    return docker.DockerClient(base_url=CLIENT_URL)


def own_image(context: Path, base: str, *lines: str) -> str:
    """An image of this test alone (a unique label), tagged `epreuve-store-test/<token>`;
    returns its id. The tag is removed at once: intake pins by id, tags name nothing."""
    token = uuid.uuid4().hex[:12]
    tag = f"epreuve-store-test/{token}:latest"
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text("\n".join([f"FROM {base}", f"LABEL test={token}",
                                                   *lines]) + "\n")
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    image_id = docker.DockerClient(base_url=CLIENT_URL).api.inspect_image(tag)["Id"]
    return image_id


def save(reference: str, destination: Path) -> Path:
    subprocess.run(["docker", "save", reference, "-o", str(destination)], check=True)
    return destination


def remove(*references: str) -> None:
    for reference in references:
        subprocess.run(["docker", "rmi", "-f", reference], capture_output=True)


def present(client, image_id: str) -> bool:
    try:
        return client.api.inspect_image(image_id)["Id"] == image_id
    except docker.errors.ImageNotFound:
        return False


def tag_of(image_id: str) -> str:
    (tag,) = docker.DockerClient(base_url=CLIENT_URL).api.inspect_image(image_id)["RepoTags"]
    return tag


def flip_a_byte(path: Path) -> None:
    """A stored blob changed on disk (a disk fault, an intruder): it is read-only."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    path.chmod(0o444)


def left_writing(store: DirectoryStore) -> list[Path]:
    """Temporary files of the store (none once a write ended, kept or refused)."""
    return list(store.incoming.iterdir()) if store.incoming.is_dir() else []


def metrics_of(session, submission_id: int) -> dict:
    return {row.case_id: (row.valid, row.metrics) for row in session.scalars(
        select(CaseResultRow).where(CaseResultRow.submission_id == submission_id))}


# -- intake keeps the copy ----------------------------------------------------------------


def test_intake_keeps_a_loadable_tag_free_copy_under_its_digest(tmp_path, client):
    image_id = own_image(tmp_path / "ctx", "epreuve/base:3.11", "USER 1000:1000",
                         'CMD ["true"]')
    tag = tag_of(image_id)
    store = DirectoryStore(tmp_path / "store")
    try:
        tar = save(tag, tmp_path / "image.tar")
        pinned = pin_tar(tar, client, store=store)
        assert list(store.digests()) == [pinned.archive_sha256]
        assert store.verify(pinned.archive_sha256)
        assert pinned.tar_sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert pinned.archive_sha256 != pinned.tar_sha256  # ours, not the participant's
        assert left_writing(store) == []
        # the stored copy alone brings the image back, untagged
        remove(tag, image_id)
        assert not present(client, image_id)
        runner = DockerRunner(state_dir=tmp_path / "runs")
        assert ensure_image(runner, store, image_id, pinned.archive_sha256) is True
        assert client.api.inspect_image(image_id)["RepoTags"] == []
        assert ensure_image(runner, store, image_id, pinned.archive_sha256) is False
    finally:
        remove(tag, image_id)


def test_the_same_image_submitted_twice_is_one_blob_and_one_row(tmp_path, client):
    image_id = own_image(tmp_path / "ctx", "epreuve/base:3.11", "USER 1000:1000",
                         'CMD ["true"]')
    tag = tag_of(image_id)
    scene = make_scene(tmp_path)
    store = open_store(scene.settings.store_dir)
    try:
        tar = save(tag, tmp_path / "image.tar")
        first = pin_tar(tar, client, store=store)
        remove(tag)  # the second intake finds the image by id, loads nothing, keeps one blob
        again = pin_tar(tar, client, store=store)
        assert first == again
        assert list(store.digests()) == [first.archive_sha256]
        with scene.sessions() as session:
            register_challenge(session, scene.challenge_file)
            one = submit(session, "test-liver", "validation", "a", first)
            two = submit(session, "test-liver", "validation", "b", again)
            assert one.image_pk == two.image_pk
            (row,) = session.scalars(select(ImageRow)).all()
            assert (row.image_id, row.archive_sha256) == (image_id, first.archive_sha256)
    finally:
        remove(tag, image_id)


def test_a_refused_image_keeps_no_blob(tmp_path, client):
    image_id = own_image(tmp_path / "ctx", "epreuve/base:3.11", "USER 0", 'CMD ["true"]')
    tag = tag_of(image_id)
    store = DirectoryStore(tmp_path / "store")
    try:
        tar = save(tag, tmp_path / "root.tar")
        with pytest.raises(ImageInvalid, match="runs as root"):
            pin_tar(tar, client, store=store, work_dir=tmp_path)
        assert list(store.digests()) == []
        assert left_writing(store) == []
        assert list(tmp_path.glob("epreuve-intake-*")) == []
    finally:
        remove(tag, image_id)


# -- ensure_image, directly ---------------------------------------------------------------


@pytest.fixture
def kept(tmp_path, client):
    """An image of this test, accepted (its archive kept), then removed from the daemon."""
    image_id = own_image(tmp_path / "ctx", "epreuve/base:3.11", "USER 1000:1000",
                         'CMD ["true"]')
    tag = tag_of(image_id)
    store = DirectoryStore(tmp_path / "store")
    pinned = pin_tar(save(tag, tmp_path / "image.tar"), client, store=store)
    remove(tag, image_id)
    yield store, pinned
    remove(image_id)


def test_an_image_on_the_node_needs_no_store(tmp_path, runner, kept, client):
    store, pinned = kept
    ensure_image(runner, store, pinned.image_id, pinned.archive_sha256)
    empty = DirectoryStore(tmp_path / "empty")
    assert ensure_image(runner, empty, pinned.image_id, None) is False


def test_a_missing_blob_is_unavailable_for_organisers(tmp_path, runner, kept):
    store, pinned = kept
    store.delete(pinned.archive_sha256)
    with pytest.raises(ImageUnavailable, match=r"its archive sha256:\w{64} is not in the image "
                                               r"store"):
        ensure_image(runner, store, pinned.image_id, pinned.archive_sha256)
    with pytest.raises(ImageUnavailable, match="no archive of it was kept"):
        ensure_image(runner, store, pinned.image_id, None)


def test_a_blob_changed_on_disk_loads_nothing(runner, kept, client):
    store, pinned = kept
    flip_a_byte(store.path(pinned.archive_sha256))
    with pytest.raises(ImageUnavailable, match="is corrupt: its bytes hash to sha256:"):
        ensure_image(runner, store, pinned.image_id, pinned.archive_sha256)
    assert not present(client, pinned.image_id)


def test_an_archive_of_another_image_is_refused(tmp_path, runner, kept, client):
    store, pinned = kept
    other = own_image(tmp_path / "other", "epreuve/base:3.11", "USER 1000:1000",
                      'CMD ["false"]')
    tag = tag_of(other)
    try:
        other_pinned = pin_tar(save(tag, tmp_path / "other.tar"), client, store=store)
        remove(tag, other)
        with pytest.raises(ImageUnavailable, match=rf"loaded, but not as the image "
                                                   rf"{pinned.image_id}"):
            ensure_image(runner, store, pinned.image_id, other_pinned.archive_sha256)
    finally:
        remove(tag, other)


def test_a_stored_archive_that_tags_is_refused_and_the_tag_put_back(tmp_path, runner, client):
    """Should the store ever hold an archive naming tags (not intake's copy), the load is
    refused and the node's tag points where it did."""
    image_id = own_image(tmp_path / "ctx", "epreuve/base:3.11", "USER 1000:1000",
                         'CMD ["true"]')
    tag = tag_of(image_id)
    store = DirectoryStore(tmp_path / "store")
    base_id = client.api.inspect_image("epreuve/base:3.11")["Id"]
    try:
        with open(save(tag, tmp_path / "tagged.tar"), "rb") as raw:  # RepoTags: [tag]
            digest = store.put(raw).sha256
        remove(tag, image_id)
        repository, _, name = tag.rpartition(":")
        client.api.tag(base_id, repository, name)  # the tag now names the base image
        with pytest.raises(ImageUnavailable, match=r"set the node's tags \['epreuve-store-test"):
            ensure_image(runner, store, image_id, digest)
        assert client.api.inspect_image(tag)["Id"] == base_id
        assert client.api.inspect_image("epreuve/base:3.11")["Id"] == base_id
    finally:
        remove(tag, image_id)
        client.api.inspect_image("epreuve/base:3.11")  # never left broken


# -- through the worker -------------------------------------------------------------------


def test_an_image_removed_after_submit_is_loaded_back_and_scores_the_same(
        tmp_path, threshold, client):
    image_id = own_image(tmp_path / "ctx", threshold)
    tag = tag_of(image_id)
    scene = make_scene(tmp_path, quota=2)
    store = open_store(scene.settings.store_dir)
    try:
        pinned = pin(tag, tmp_path, store)
        with scene.sessions() as session:
            register_challenge(session, scene.challenge_file)
            kept_on_node = submit(session, "test-liver", "validation", "t", pinned).id
            session.commit()
        worker = worker_for(scene)
        worker.run(until_idle=True)
        with scene.sessions() as session:
            vanished = submit(session, "test-liver", "validation", "t", pinned).id
            session.commit()
        remove(tag, image_id)  # an operator's `docker rmi` after submit
        assert not present(client, image_id)

        worker.run(until_idle=True)
        assert client.api.inspect_image(image_id)["RepoTags"] == []  # back, by id only
        with scene.sessions() as session:
            for submission_id in (kept_on_node, vanished):
                row = session.get(SubmissionRow, submission_id)
                assert (row.status, row.reason) == ("succeeded", None), row.message
            assert metrics_of(session, vanished) == metrics_of(session, kept_on_node)
            assert len(metrics_of(session, vanished)) == 3
            assert all(valid for valid, _ in metrics_of(session, vanished).values())
    finally:
        remove(tag, image_id)


def test_a_corrupt_stored_image_is_the_platforms_failure(tmp_path, threshold, client):
    image_id = own_image(tmp_path / "ctx", threshold)
    tag = tag_of(image_id)
    scene = make_scene(tmp_path, quota=1)
    store = open_store(scene.settings.store_dir)
    try:
        pinned = pin(tag, tmp_path, store)
        with scene.sessions() as session:
            register_challenge(session, scene.challenge_file)
            sub = submit(session, "test-liver", "validation", "t", pinned).id
            session.commit()
        remove(tag, image_id)
        flip_a_byte(store.path(pinned.archive_sha256))

        worker_for(scene).run(until_idle=True)
        assert not present(client, image_id)  # the changed bytes never loaded
        with scene.sessions() as session:
            assert_failed_by_the_platform(session, sub, messages_platform("loading the image"))
            job = session.scalars(select(JobRow).where(JobRow.submission_id == sub)).one()
            detail = job.run_result["infrastructure_detail"]
            assert "ImageUnavailable" in detail and "is corrupt" in detail  # for organisers
            # the quota of one is still free: the platform's failure cost the team nothing
            assert submit(session, "test-liver", "validation", "t", pinned).id == sub + 1
    finally:
        remove(tag, image_id)


def restamp_first_header(path: Path) -> None:
    """Change the stored archive where the daemon never looks: the first entry's mtime (its
    header checksum made right again), so only the digest tells the bytes changed."""
    import tarfile

    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    header = bytearray(data[:512])
    header[136:148] = b"%011o\0" % 1_000_000
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    tarfile.TarInfo.frombuf(bytes(header), "utf-8", "surrogateescape")  # still a valid header
    data[:512] = header
    path.write_bytes(bytes(data))
    path.chmod(0o444)


def test_a_blob_changed_where_the_daemon_never_looks_loads_nothing(runner, kept, client):
    """Docker would load this archive (it checks layers, not headers): the digest alone
    refuses it, before the daemon has the end of the stream."""
    store, pinned = kept
    restamp_first_header(store.path(pinned.archive_sha256))
    with pytest.raises(ImageUnavailable, match="is corrupt"):
        ensure_image(runner, store, pinned.image_id, pinned.archive_sha256)
    assert not present(client, pinned.image_id)
