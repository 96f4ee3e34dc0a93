"""`epreuve store gc` over a real store and real rows: what the policy keeps whatever its
age (final phases, ranked images, submissions not ended, uploads being validated), what
it removes once the grace period is over, and `--dry-run` removing nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from engine import retention
from engine.db.models import ImageRow, IntakeRow, PhaseRow, SubmissionRow, utcnow
from engine.statuses import IntakeStatus, SubmissionStatus
from engine.store import DirectoryStore
from engine.submissions import get_or_create_team, register_challenge
from tests.engine_fixtures import make_scene

EPREUVE = str(Path(sys.executable).parent / "epreuve")
OLD = timedelta(days=60)
LATELY = timedelta(days=2)


class Shelf:
    """A scene whose store holds one blob per situation, each named."""

    def __init__(self, root: Path, database_url: str | None = None):
        self.scene = make_scene(root, database_url=database_url)
        self.store = DirectoryStore(self.scene.settings.store_dir)
        self.blobs: dict[str, str] = {}
        self.now = utcnow()
        with self.scene.sessions() as session:
            register_challenge(session, self.scene.challenge_file)
            session.commit()

    def blob(self, name: str, age: timedelta = timedelta(0)) -> str:
        digest = self.store.put(io.BytesIO(f"bytes of {name}".encode())).sha256
        when = time.time() - age.total_seconds()
        os.utime(self.store.path(digest), (when, when))
        self.blobs[name] = digest
        return digest

    def image(self, session, name: str) -> ImageRow:
        image = ImageRow(image_id=f"sha256:{self.blob(name, OLD)}", tar_sha256="0" * 64,
                         archive_sha256=self.blobs[name], layers=[], reference=name,
                         architecture="amd64", user="1000:1000", size_bytes=1,
                         created_at=self.now - OLD)
        session.add(image)
        session.flush()
        return image

    def submission(self, session, name: str, phase: str, team: str, status: str,
                   ago: timedelta = OLD, image: ImageRow | None = None) -> SubmissionRow:
        phase_row = session.scalar(select(PhaseRow).where(
            PhaseRow.challenge_id == "test-liver", PhaseRow.slug == phase))
        ended = status in retention.ENDED
        row = SubmissionRow(phase=phase_row, team=get_or_create_team(session, team),
                            image=image or self.image(session, name), status=status,
                            created_at=self.now - ago,
                            finished_at=self.now - ago if ended else None)
        session.add(row)
        session.flush()
        return row

    def intake(self, session, name: str, status: str) -> None:
        team = get_or_create_team(session, "uploader")
        session.add(IntakeRow(token_id=1, team_id=team.id, idempotency_key=name,
                              request_sha256="0" * 64, upload_id=name,
                              tar_sha256=self.blob(name, OLD), tar_bytes=1,
                              challenge_id="test-liver", phase_slug="validation",
                              status=status, created_at=self.now - OLD,
                              updated_at=self.now - OLD))
        session.flush()


@pytest.fixture
def shelf(tmp_path) -> Shelf:
    shelf = Shelf(tmp_path)
    with shelf.scene.sessions() as session:
        shelf.submission(session, "final", "final", "red", SubmissionStatus.FAILED)
        shelf.submission(session, "superseded", "validation", "blue", SubmissionStatus.SUCCEEDED,
                         ago=OLD + timedelta(days=1))
        shelf.submission(session, "ranked", "validation", "blue", SubmissionStatus.SUCCEEDED)
        shelf.submission(session, "queued", "validation", "green", SubmissionStatus.QUEUED)
        shelf.submission(session, "failed", "validation", "green", SubmissionStatus.FAILED)
        shelf.submission(session, "failed lately", "validation", "white",
                         SubmissionStatus.FAILED, ago=LATELY)
        reused = shelf.image(session, "old image run again lately")
        shelf.submission(session, "", "validation", "black", SubmissionStatus.CANCELLED,
                         image=reused)
        shelf.submission(session, "", "closed", "black", SubmissionStatus.FAILED, ago=LATELY,
                         image=reused)
        shelf.intake(session, "upload being validated", IntakeStatus.VALIDATING)
        shelf.intake(session, "upload converted", IntakeStatus.ACCEPTED)
        session.commit()
    shelf.blob("orphan", OLD)
    shelf.blob("orphan written lately", LATELY)
    shelf.store.incoming.mkdir(parents=True, exist_ok=True)
    for name, age in (("blob-dead-writer", timedelta(days=2)), ("blob-alive", timedelta(0))):
        (shelf.store.incoming / name).write_bytes(b"half")
        when = time.time() - age.total_seconds()
        os.utime(shelf.store.incoming / name, (when, when))
    return shelf


REMOVED = {"superseded", "failed", "upload converted", "orphan"}
KEPT = {"final": retention.FINAL_PHASE, "ranked": retention.RANKED,
        "queued": retention.NOT_ENDED, "failed lately": retention.RECENT,
        "old image run again lately": retention.RECENT,
        "upload being validated": retention.VALIDATING,
        "orphan written lately": retention.RECENT}


def test_the_plan_keeps_what_the_policy_names_and_removes_the_rest(shelf):
    with shelf.scene.sessions() as session:
        plan = retention.plan(session, shelf.store)
    by_digest = {digest: name for name, digest in shelf.blobs.items()}
    assert {by_digest[r.sha256] for r in plan.removals} == REMOVED
    assert {by_digest[d]: why for d, why in plan.kept.items()} == KEPT
    assert [p.name for p in plan.stale_incoming] == ["blob-dead-writer"]
    assert all(shelf.store.has(d) for d in shelf.blobs.values())  # a plan removes nothing


def test_a_shorter_grace_removes_what_was_used_lately_but_never_what_a_rule_keeps(shelf):
    with shelf.scene.sessions() as session:
        plan = retention.plan(session, shelf.store, retention.Policy(grace=timedelta(days=1)))
    by_digest = {digest: name for name, digest in shelf.blobs.items()}
    assert {by_digest[r.sha256] for r in plan.removals} == REMOVED | {
        "failed lately", "old image run again lately", "orphan written lately"}


def cli(shelf: Shelf, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    settings = shelf.scene.settings
    env = {**os.environ, "EPREUVE_DATA_DIR": str(settings.data_dir),
           "EPREUVE_DATABASE_URL": settings.database_url,
           "EPREUVE_STATE_DIR": str(settings.state_dir), "COLUMNS": "200",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([EPREUVE, "store", "gc", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, (proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_store_gc_dry_run_then_for_real(shelf):
    dry = json.loads(cli(shelf, "--dry-run", "--json").stdout)
    assert dry["dry_run"] and len(dry["removed"]) == len(REMOVED)
    assert dry["bytes_freed"] == sum(r["bytes"] for r in dry["removed"]) > 0
    assert all(shelf.store.has(d) for d in shelf.blobs.values())
    assert (shelf.store.incoming / "blob-dead-writer").exists()

    done = cli(shelf).stdout
    assert f"removed {len(REMOVED)} blob(s)" in done
    for name, digest in shelf.blobs.items():
        assert shelf.store.has(digest) == (name not in REMOVED), name
    assert sorted(p.name for p in shelf.store.incoming.iterdir()) == ["blob-alive"]
    again = json.loads(cli(shelf, "--json").stdout)
    assert again["removed"] == [] and again["stale_incoming_removed"] == 0


def test_on_postgresql_too(tmp_path):
    from tests.conftest import postgres_sessions

    postgres_sessions()  # a clean schema, or a skip without PostgreSQL
    shelf = Shelf(tmp_path, os.environ["EPREUVE_TEST_POSTGRES_URL"])
    with shelf.scene.sessions() as session:
        shelf.submission(session, "final", "final", "red", SubmissionStatus.CANCELLED)
        shelf.submission(session, "failed", "validation", "green", SubmissionStatus.FAILED)
        session.commit()
        plan = retention.plan(session, shelf.store)
    assert [r.sha256 for r in plan.removals] == [shelf.blobs["failed"]]
    assert plan.kept == {shelf.blobs["final"]: retention.FINAL_PHASE}
