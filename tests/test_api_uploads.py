"""Resumable image uploads (tus) and submission creation, against a real uvicorn server.

The server is a subprocess on a loopback port (tests/uploads_app.py: the upload router with
fixed test tokens); uploads are cut off, servers SIGKILLed and restarted, bodies lie about
their size, other teams probe, keys are replayed, and hostile archives are submitted.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import pytest
from sqlalchemy import func, select
from tusclient import client as tus_client

from engine.client import Api, UploadState, upload_image
from engine.db.models import ImageRow, IntakeRow, SubmissionRow
from engine.intakes import IntakeRunner, SubmissionRequest, intake_view, open_intake
from engine.store import DirectoryStore
from engine.submissions import get_or_create_team, register_challenge
from engine.uploads import Owner, UploadArea, UploadNotFound
from tests.conftest import postgres_sessions
from tests.engine_fixtures import make_scene
from tests.test_image_intake_attacks import GROUP, archive, layer
from tests.upload_server import UploadServer

TUS = {"Tus-Resumable": "1.0.0"}
WAIT_SECONDS = 120  # how long a condition may take before the test fails
ALPHA, ALPHA_OTHER_TOKEN, BETA, WORKER = "tok-alpha", "tok-alpha-2", "tok-beta", "tok-worker"


def wait_for(condition, what: str):
    """Poll until `condition()` is truthy (a condition, not a timing assertion)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def metadata(challenge: str = "test-liver", phase: str = "validation") -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}"
                    for k, v in (("challenge", challenge), ("phase", phase)))


@pytest.fixture(scope="module", params=["sqlite"])
def scene(request, module_tmp):
    url = None
    if request.param == "postgres":
        sessions = postgres_sessions()
        url = str(sessions.kw["bind"].url.render_as_string(hide_password=False))
    scene = make_scene(module_tmp("scene"), database_url=url)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        alpha, beta = get_or_create_team(session, "alpha"), get_or_create_team(session, "beta")
        session.commit()
        scene.tokens = {ALPHA: [1, "participant", alpha.id],
                        ALPHA_OTHER_TOKEN: [2, "participant", alpha.id],
                        BETA: [3, "participant", beta.id], WORKER: [4, "worker", None]}
    return scene


@pytest.fixture(scope="module")
def server(scene, module_tmp):
    """One server per module and database (tests use their own uploads and keys)."""
    log = module_tmp("server") / "server.log"
    server = UploadServer(scene.settings, scene.tokens, log).start()
    yield server
    server.stop()


@pytest.fixture
def own_server(scene, tmp_path):
    """A server of this test alone (it is killed)."""
    server = UploadServer(scene.settings, scene.tokens, tmp_path / "server.log").start()
    yield server
    server.stop()


def client(server: UploadServer, token: str = ALPHA) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                        timeout=60)


def create(http: httpx.Client, length: int, meta: str | None = None) -> str:
    response = http.post("/api/v1/uploads", headers={
        **TUS, "Upload-Length": str(length), "Upload-Metadata": meta or metadata()})
    assert response.status_code == 201, response.text
    return response.headers["Location"]


def patch(http: httpx.Client, url: str, offset: int, body, **headers) -> httpx.Response:
    return http.patch(url, content=body, headers={
        **TUS, "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream", **headers})


def offset_of(http: httpx.Client, url: str) -> int:
    response = http.head(url, headers=TUS)
    assert response.status_code == 200
    return int(response.headers["Upload-Offset"])


def cut_off_patch(server: UploadServer, url: str, total: int, data: bytes) -> socket.socket:
    """A PATCH that announces `total` bytes, of which `data` is sent: the socket is left
    open for the caller to close (a client that vanished) or to outlive (a killed server)."""
    path = httpx.URL(url).raw_path.decode()
    head = (f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {ALPHA}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            "Content-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {total}\r\n\r\n").encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(head + data)
    return connection


# -- the protocol: a real tus client ---------------------------------------------------------


def test_tuspy_uploads_in_two_sittings_and_the_bytes_arrive_whole(server, scene, tmp_path):
    tar = random_file(tmp_path / "image.tar", 5 * (1 << 20) + 123)
    tus = tus_client.TusClient(f"{server.url}/api/v1/uploads",
                               headers={"Authorization": f"Bearer {ALPHA}"})
    first = tus.uploader(str(tar), chunk_size=1 << 20,
                         metadata={"challenge": "test-liver", "phase": "validation"})
    first.upload(stop_at=2 << 20)  # the client stops after 2 MiB
    with client(server) as http:
        assert offset_of(http, first.url) == 2 << 20
    second = tus.uploader(str(tar), chunk_size=1 << 20, url=first.url)
    assert second.offset == 2 << 20  # resumed where the server's copy ends
    second.upload()
    with client(server) as http:
        head = http.head(first.url, headers=TUS)
    assert head.headers["Upload-Offset"] == str(tar.stat().st_size)
    assert head.headers["Epreuve-Upload-Sha256"] == sha256_of(tar)
    assert DirectoryStore(scene.settings.store_dir).verify(sha256_of(tar))


def test_options_names_the_version_and_extensions(server):
    with client(server) as http:
        response = http.options("/api/v1/uploads")
    assert response.status_code == 204
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) >= {"creation", "expiration"}


# -- interrupted: by the client, by the network, by a killed server -----------------------


class Stop(Exception):
    pass


def test_the_cli_client_resumes_an_upload_it_stopped_halfway(server, scene, tmp_path):
    tar = random_file(tmp_path / "image.tar", 6 * (1 << 20) + 7)
    state = tmp_path / "client-state"

    def stop_after_two_chunks(sent: int, total: int) -> None:
        if sent >= 2 << 20:
            raise Stop

    with Api(server.url, ALPHA) as api:
        with pytest.raises(Stop):
            api.upload(tar, "test-liver", "validation", state_dir=state,
                       progress=stop_after_two_chunks, chunk_bytes=1 << 20)
        remembered = UploadState(state, api.server, tar).url()
        assert remembered is not None
        assert offset_of(api.http, remembered) == 2 << 20
        seen: list[int] = []
        result = api.upload(tar, "test-liver", "validation", state_dir=state,
                            progress=lambda sent, total: seen.append(sent),
                            chunk_bytes=1 << 20)
    assert seen[0] == 2 << 20  # continued, not restarted
    assert result.upload_url == remembered
    assert result.sha256 == sha256_of(tar)
    assert UploadState(state, server.url, tar).url() == remembered  # until it is submitted


def test_a_connection_cut_mid_body_keeps_what_arrived(server, tmp_path):
    tar = random_file(tmp_path / "image.tar", 4 << 20)
    data = tar.read_bytes()
    with client(server) as http:
        url = create(http, len(data))
        connection = cut_off_patch(server, url, len(data), data[: 3 << 20 >> 1])
        kept = wait_for(lambda: offset_of(http, url) >= 1 << 20, "the first MiB on disk")
        connection.close()
        assert kept
    with Api(server.url, ALPHA) as api:
        state = tmp_path / "client-state"
        UploadState(state, api.server, tar).remember(url)
        seen: list[int] = []
        result = api.upload(tar, "test-liver", "validation", state_dir=state,
                            progress=lambda sent, total: seen.append(sent))
    assert seen[0] >= 1 << 20
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_a_server_killed_mid_upload_resumes_after_a_restart(own_server, scene, tmp_path):
    server = own_server
    tar = random_file(tmp_path / "image.tar", 5 << 20)
    data = tar.read_bytes()
    with client(server) as http:
        url = create(http, len(data))
        connection = cut_off_patch(server, url, len(data), data[: 3 << 20])
        wait_for(lambda: offset_of(http, url) >= 2 << 20, "two MiB on disk")
    server.kill()  # mid-request: the body is still arriving
    connection.close()
    server.start()  # a new process: no running hash, only the files
    with client(server) as http:
        survived = offset_of(http, url)
    assert 2 << 20 <= survived <= 3 << 20
    with Api(server.url, ALPHA) as api:
        state = tmp_path / "client-state"
        UploadState(state, api.server, tar).remember(url)
        result = api.upload(tar, "test-liver", "validation", state_dir=state,
                            chunk_bytes=1 << 20)
    assert result.sha256 == hashlib.sha256(data).hexdigest()  # the prefix was hashed again
    assert DirectoryStore(scene.settings.store_dir).verify(result.sha256)


# -- refusals ------------------------------------------------------------------------------


def test_a_wrong_offset_is_409_and_changes_nothing(server):
    with client(server) as http:
        url = create(http, 100)
        assert patch(http, url, 0, b"a" * 40).status_code == 204
        for wrong in (0, 39, 41, 100):
            response = patch(http, url, wrong, b"b" * 10)
            assert response.status_code == 409, response.text
            assert "HEAD" in response.json()["error"]["message"]
        assert offset_of(http, url) == 40


def test_an_upload_over_the_phase_cap_is_413_at_creation(server):
    with client(server) as http:
        response = http.post("/api/v1/uploads", headers={
            **TUS, "Upload-Length": str(21 << 30), "Upload-Metadata": metadata()})
    assert response.status_code == 413
    assert "at most" in response.json()["error"]["message"]


def test_a_body_bigger_than_declared_is_refused_and_undone(server):
    declared = 3 << 19  # 1.5 MiB: the first MiB of a longer body reaches the disk first
    with client(server) as http:
        url = create(http, declared)
        assert patch(http, url, 0, b"x" * (declared + 1)).status_code == 413  # Content-Length

        def chunked():  # no Content-Length: refused when the bytes pass the length
            for _ in range(8):
                yield b"y" * (1 << 18)

        response = patch(http, url, 0, chunked())
        assert response.status_code == 413, response.text
        assert offset_of(http, url) == 0  # the whole request undone, not its first MiB kept
        assert patch(http, url, 0, b"z" * declared).status_code == 204


@pytest.mark.parametrize("headers, status", [
    ({"Upload-Length": "-1"}, 400), ({"Upload-Length": "1e3"}, 400), ({}, 400),
    ({"Upload-Length": "10", "Upload-Metadata": "challenge !!!"}, 400),
    ({"Upload-Length": "10", "Upload-Metadata": metadata(phase="nope")}, 404),
    ({"Upload-Length": "10", "Upload-Metadata": metadata(challenge="../x")}, 404),
    ({"Upload-Length": "10", "Tus-Resumable": "0.2.2"}, 412),
])
def test_malformed_creations_get_the_error_body(server, headers, status):
    with client(server) as http:
        response = http.post("/api/v1/uploads", headers={
            **TUS, "Upload-Metadata": metadata(), **headers})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_a_patch_of_another_type_is_415(server):
    with client(server) as http:
        url = create(http, 10)
        response = http.patch(url, content=b"0123456789", headers={
            **TUS, "Upload-Offset": "0", "Content-Type": "application/json"})
    assert response.status_code == 415


def test_another_teams_upload_does_not_exist_for_it(server):
    with client(server) as alpha, client(server, BETA) as beta, \
            client(server, ALPHA_OTHER_TOKEN) as teammate:
        url = create(alpha, 20)
        assert beta.head(url, headers=TUS).status_code == 404
        assert patch(beta, url, 0, b"b" * 20).status_code == 404
        assert beta.delete(url, headers=TUS).status_code == 404
        assert offset_of(alpha, url) == 0
        assert patch(teammate, url, 0, b"a" * 20).status_code == 204  # the team's upload
        guessed = url.rsplit("/", 1)[0] + "/" + "A" * 32
        assert alpha.head(guessed, headers=TUS).status_code == 404
        assert alpha.head(url.rsplit("/", 1)[0] + "/..%2F..%2Fetc", headers=TUS
                          ).status_code == 404


def test_a_token_without_a_team_cannot_upload(server):
    with client(server, WORKER) as worker, client(server, "no-such-token") as stranger:
        assert worker.post("/api/v1/uploads", headers={
            **TUS, "Upload-Length": "10", "Upload-Metadata": metadata()}).status_code == 403
        assert stranger.post("/api/v1/uploads", headers={
            **TUS, "Upload-Length": "10", "Upload-Metadata": metadata()}).status_code == 401


def test_a_deleted_upload_is_gone(server, scene):
    with client(server) as http:
        url = create(http, 10)
        assert http.delete(url, headers=TUS).status_code == 204
        assert http.head(url, headers=TUS).status_code == 404
    upload_id = url.rsplit("/", 1)[1]
    assert not list(scene.settings.uploads_dir.glob(f"{upload_id}.*"))


def test_unfinished_uploads_expire_and_the_sweep_removes_them(tmp_path):
    area = UploadArea(tmp_path / "uploads", DirectoryStore(tmp_path / "store"),
                      expiry=timedelta(hours=1))
    owner = Owner(token_id=1, team_id=7)
    now = datetime.now(UTC)
    old = area.create(owner, 100, cap=1000, metadata={}, now=now - timedelta(hours=2))
    fresh = area.create(owner, 100, cap=1000, metadata={}, now=now)
    with area.appending(fresh.id, owner, 0) as appender:
        appender.write(b"a" * 10)
    with pytest.raises(UploadNotFound):  # expired: gone for its owner even before a sweep
        area.get(old.id, owner)
    assert area.sweep(now) == 1
    assert not (tmp_path / "uploads" / f"{old.id}.part").exists()
    assert area.get(fresh.id, owner).offset == 10
    assert area.sweep(now + timedelta(hours=1, minutes=1)) == 1  # an hour after its append
    assert not list((tmp_path / "uploads").iterdir())


def test_the_expiry_is_announced(server):
    with client(server) as http:
        response = http.post("/api/v1/uploads", headers={
            **TUS, "Upload-Length": "10", "Upload-Metadata": metadata()})
    expires = datetime.strptime(response.headers["Upload-Expires"], "%a, %d %b %Y %H:%M:%S GMT")
    assert expires.replace(tzinfo=UTC) > datetime.now(UTC) + timedelta(hours=23)


def test_server_memory_stays_bounded_for_a_large_body(server, tmp_path):
    size = 256 << 20
    with client(server) as http:
        url = create(http, size)
        before = server.rss_kib()

        def body():
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                yield block

        assert patch(http, url, 0, body(), **{"Content-Length": str(size)}).status_code == 204
        growth_mib = (server.rss_kib() - before) / 1024
    assert growth_mib < 64, f"the server grew by {growth_mib:.0f} MiB for a 256 MiB body"


# -- submissions: idempotent creation, validation after the request --------------------------


def upload_tar(server: UploadServer, tar: Path, state: Path, token: str = ALPHA) -> str:
    with Api(server.url, token) as api:
        return api.upload(tar, "test-liver", "validation", state_dir=state).upload_id


def submit(http: httpx.Client, upload_id: str, key: str, **extra) -> httpx.Response:
    return http.post("/api/v1/submissions", headers={"Idempotency-Key": key}, json={
        "upload_id": upload_id, "challenge": "test-liver", "phase": "validation", **extra})


def settled(http: httpx.Client, intake_id: int) -> dict:
    return wait_for(lambda: (body := http.get(f"/api/v1/intakes/{intake_id}").json())[
        "status"] != "validating" and body, f"intake {intake_id} checked")


@pytest.mark.parametrize("scene", ["sqlite", "postgres"], indirect=True)
def test_a_retried_submission_is_the_same_one(server, scene, tmp_path):
    tar = archive(tmp_path / "root.tar", user="root")
    upload_id = upload_tar(server, tar, tmp_path / "state")
    with client(server) as http:
        first, again = submit(http, upload_id, "key-1"), submit(http, upload_id, "key-1")
        assert first.status_code == again.status_code == 202, first.text
        assert first.json()["id"] == again.json()["id"]
        changed = submit(http, upload_id, "key-1", license="MIT")
        assert changed.status_code == 422
        assert "another request" in changed.json()["error"]["message"]
        assert submit(http, upload_id, "key-2").status_code == 409  # one upload, one intake
        assert submit(http, upload_id, "").status_code == 422
    with client(server, ALPHA_OTHER_TOKEN) as teammate:  # keys are per token
        assert submit(teammate, upload_id, "key-1").status_code == 409
    with client(server, BETA) as beta:
        assert submit(beta, upload_id, "key-1").status_code == 404
        assert beta.get(f"/api/v1/intakes/{first.json()['id']}").status_code == 404
    with scene.sessions() as session:
        assert session.scalar(select(func.count()).select_from(IntakeRow).where(
            IntakeRow.upload_id == upload_id)) == 1


@pytest.mark.parametrize("scene", ["sqlite", "postgres"], indirect=True)
def test_a_hostile_archive_ends_as_image_invalid_after_the_request(server, scene, tmp_path):
    tar = archive(tmp_path / "root.tar", user="root")
    upload_id = upload_tar(server, tar, tmp_path / "state")
    key = f"key-{time.time_ns()}"
    with client(server) as http:
        response = submit(http, upload_id, key)
        assert response.status_code == 202
        assert response.json()["status"] in ("validating", "refused")
        intake = settled(http, response.json()["id"])
    assert intake["status"] == "refused"
    assert intake["reason"] == "IMAGE_INVALID"
    assert "root" in intake["message"]
    assert intake["archive_sha256"] == sha256_of(tar)
    with scene.sessions() as session:
        assert session.get(IntakeRow, intake["id"]).submission_id is None


def test_an_unfinished_upload_cannot_be_submitted(server):
    with client(server) as http:
        url = create(http, 100)
        response = submit(http, url.rsplit("/", 1)[1], f"key-{time.time_ns()}")
    assert response.status_code == 409
    assert "finish it" in response.json()["error"]["message"]


def test_a_valid_archive_becomes_a_queued_submission(server, scene, tmp_path, docker_engine):
    layers = [layer({"etc/passwd": f"algo:x:1000:1000::/:/bin/sh\n{time.time_ns()}".encode(),
                     "etc/group": GROUP})]  # unique bytes: an image of this test only
    tar = archive(tmp_path / "ok.tar", layers=layers)
    upload_id = upload_tar(server, tar, tmp_path / "state")
    key = f"key-{time.time_ns()}"
    try:
        with client(server) as http:
            intake = settled(http, submit(http, upload_id, key).json()["id"])
            assert intake["status"] == "accepted", intake
            assert intake["submission_status"] == "queued"
            assert submit(http, upload_id, key).json()["submission_id"] == \
                intake["submission_id"]
        with scene.sessions() as session:
            submission = session.get(SubmissionRow, intake["submission_id"])
            assert submission.team.name == "alpha"
            assert submission.image.tar_sha256 == sha256_of(tar)
            assert session.scalar(select(func.count()).select_from(SubmissionRow).join(
                ImageRow).where(ImageRow.tar_sha256 == sha256_of(tar))) == 1
    finally:
        _remove_test_images(scene)


def _remove_test_images(scene) -> None:
    engine = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    with scene.sessions() as session:
        for image_id in session.scalars(select(ImageRow.image_id)):
            with contextlib.suppress(docker.errors.APIError):
                engine.api.remove_image(image_id, force=True)


def test_the_cli_submits_through_the_server_and_shows_the_refusal(server, tmp_path,
                                                                  monkeypatch):
    from typer.testing import CliRunner

    from engine.cli import app

    tar = archive(tmp_path / "root.tar", user="0")
    monkeypatch.setenv("EPREUVE_DATA_DIR", str(tmp_path / "client-data"))
    monkeypatch.setenv("EPREUVE_SERVER", server.url)
    monkeypatch.setenv("EPREUVE_TOKEN", ALPHA)
    result = CliRunner().invoke(app, ["submit", str(tar), "-c", "test-liver", "-p",
                                      "validation"])
    assert result.exit_code == 1, result.output
    assert "IMAGE_INVALID" in result.output and "root" in result.output
    assert "Traceback" not in result.output
    assert not list((tmp_path / "client-data" / "client" / "uploads").glob("*.json"))


def test_an_intake_left_by_a_killed_server_is_checked_by_the_next(scene, tmp_path):
    """The check runs in the server's threads: a server that dies mid-check leaves the
    intake `validating`; the next server's startup takes it up again."""
    tar = archive(tmp_path / "root.tar", user="root")
    area = UploadArea(scene.settings.uploads_dir, DirectoryStore(scene.settings.store_dir))
    team_id = scene.tokens[ALPHA][2]
    owner = Owner(token_id=1, team_id=team_id)
    upload = area.create(owner, tar.stat().st_size, cap=1 << 30,
                         metadata={"challenge": "test-liver", "phase": "validation"})
    with area.appending(upload.id, owner, 0) as appender:
        appender.write(tar.read_bytes())
    request = SubmissionRequest(upload.id, "test-liver", "validation")
    with scene.sessions() as session:  # what the request of the dead server committed
        intake_id = open_intake(session, token_id=1, team_id=team_id, key=upload.id,
                                request=request, upload=area.get(upload.id, owner))[0].id
        session.commit()
    server = UploadServer(scene.settings, scene.tokens, tmp_path / "server.log").start()
    try:
        with client(server) as http:
            intake = settled(http, intake_id)
    finally:
        server.stop()
    assert (intake["status"], intake["reason"]) == ("refused", "IMAGE_INVALID")


def test_the_check_reports_its_progress_on_the_intake(scene, tmp_path):
    tar = archive(tmp_path / "root.tar", user="root")
    store = DirectoryStore(scene.settings.store_dir)
    area = UploadArea(scene.settings.uploads_dir, store)
    owner = Owner(token_id=1, team_id=scene.tokens[ALPHA][2])
    upload = area.create(owner, tar.stat().st_size, cap=1 << 30,
                         metadata={"challenge": "test-liver", "phase": "validation"})
    with area.appending(upload.id, owner, 0) as appender:
        appender.write(tar.read_bytes())
    with scene.sessions() as session:
        intake_id = open_intake(session, token_id=1, team_id=owner.team_id, key=upload.id,
                                request=SubmissionRequest(upload.id, "test-liver",
                                                          "validation"),
                                upload=area.get(upload.id, owner))[0].id
        session.commit()
    runner = IntakeRunner(scene.sessions, scene.settings, store)
    report = runner._progress(intake_id, "checking")
    report(12 << 20, 100 << 20)
    report((12 << 20) + 1, 100 << 20)  # a few bytes more: not worth a write
    with scene.sessions() as session:
        view = intake_view(session, session.get(IntakeRow, intake_id))
    assert (view["status"], view["stage"], view["bytes_checked"]) == \
        ("validating", "checking", 12 << 20)
    runner.run(intake_id)  # the check itself, here in the test's thread
    with scene.sessions() as session:
        assert session.get(IntakeRow, intake_id).status == "refused"


def test_a_crash_between_the_digest_and_the_move_is_finished_on_the_next_read(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    area = UploadArea(tmp_path / "uploads", store)
    owner = Owner(token_id=1, team_id=7)
    upload = area.create(owner, 5, cap=10, metadata={})
    (tmp_path / "uploads" / f"{upload.id}.part").write_bytes(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    area._write_state(dataclasses.replace(upload, sha256=digest))  # then the server died
    assert area.get(upload.id, owner).sha256 == digest
    assert store.verify(digest)
    assert not (tmp_path / "uploads" / f"{upload.id}.part").exists()


def test_the_sweep_leaves_an_upload_being_written(tmp_path):
    area = UploadArea(tmp_path / "uploads", DirectoryStore(tmp_path / "store"),
                      expiry=timedelta(seconds=0))
    owner = Owner(token_id=1, team_id=7)
    upload = area.create(owner, 10, cap=10, metadata={}, now=datetime.now(UTC) + timedelta(1))
    with area.appending(upload.id, owner, 0) as appender:
        appender.write(b"abc")
        assert area.sweep(datetime.now(UTC) + timedelta(days=2)) == 0
    assert area.sweep(datetime.now(UTC) + timedelta(days=2)) == 1


def test_a_local_image_is_saved_uploaded_and_submitted(server, scene, tmp_path,
                                                        docker_engine):
    """`submit IMAGE --server`: the image is `docker save`d under the data dir (kept until
    submitted, so an interrupted upload resumes), uploaded, and becomes a submission."""
    context = tmp_path / "tiny"
    context.mkdir()
    (context / "stamp").write_text(str(time.time_ns()))  # an image of this test only
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY stamp /stamp\nUSER 1000:1000\nCMD ["/stamp"]\n')
    tag = "epreuve-test/uploads-tiny:latest"
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    state = tmp_path / "client-state"
    try:
        intake = upload_image(server.url, ALPHA, tag, "test-liver", "validation",
                              state_dir=state)
        with client(server) as http:
            intake = settled(http, intake["id"])
        assert intake["status"] == "accepted", intake
        assert not list((state / "saved").glob("*.tar"))  # submitted: the copy is gone
        assert not list((state / "uploads").glob("*.json"))
    finally:
        _remove_test_images(scene)
        with contextlib.suppress(docker.errors.APIError):
            docker.DockerClient(base_url="unix:///var/run/docker.sock").api.remove_image(
                tag, force=True)


@pytest.mark.parametrize("scene", ["sqlite", "postgres"], indirect=True)
def test_racing_retries_with_one_key_make_one_intake(server, scene, tmp_path):
    tar = archive(tmp_path / "root.tar", user="root")
    upload_id = upload_tar(server, tar, tmp_path / "state")
    key = f"race-{time.time_ns()}"
    start = threading.Barrier(8)

    def post(_):
        with client(server) as http:
            start.wait()
            return submit(http, upload_id, key)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    with scene.sessions() as session:
        assert session.scalar(select(func.count()).select_from(IntakeRow).where(
            IntakeRow.upload_id == upload_id)) == 1


def test_a_store_on_another_filesystem_gets_a_copy(tmp_path):
    """`adopt` renames; across filesystems (a store on its own disk) the bytes are copied."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
        store = DirectoryStore(Path(other) / "store")
        area = UploadArea(tmp_path / "uploads", store)
        owner = Owner(token_id=1, team_id=7)
        upload = area.create(owner, 6, cap=10, metadata={})
        with area.appending(upload.id, owner, 0) as appender:
            appender.write(b"abcdef")
        assert area.get(upload.id, owner).sha256 == hashlib.sha256(b"abcdef").hexdigest()
        assert store.verify(hashlib.sha256(b"abcdef").hexdigest())
        assert not (tmp_path / "uploads" / f"{upload.id}.part").exists()
