"""From a whole upload to a submission, outside the request that asked for it.

`POST /api/v1/submissions` only records an intake (an `IntakeRow`) and answers at once;
a background thread of the server then validates the archive (`pin_tar`: bounded reading,
our own copy loaded, pinned by id) and creates the submission (`submit`: phase open,
quota, prize rules). A multi-GB image never holds a request open. Meanwhile the intake
shows how far the check is; in the end it is `accepted` (linked to its submission, in the
same transaction as the submission itself) or `refused` with the reason and the message.

Creating one is idempotent: the intake is keyed by (token, Idempotency-Key), and a retry
with the same key and body finds the first one; the same key with another body is refused.
An upload becomes at most one intake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import docker
import docker.errors
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine.challenges import ChallengeError
from engine.config import Settings
from engine.db.models import IntakeRow, SubmissionRow, TeamRow, utcnow
from engine.errors import Conflict, EpreuveError, NotFound
from engine.images import ImageInvalid, ImageNotKept, pin_tar
from engine.statuses import IntakeStatus
from engine.store import DirectoryStore
from engine.submissions import SubmissionRefused, find_phase, submit
from engine.uploads import Upload, UploadIncomplete
from runners.base import FailureReason

log = logging.getLogger(__name__)
MAX_KEY = 200
PROGRESS_STEP = 8 << 20  # write the intake's progress at most every 8 MiB (or 2%)


class IdempotencyKeyReused(EpreuveError):
    """The same Idempotency-Key was used before with another request body."""

    http_status = 422


class IntakeNotFound(NotFound):
    """No intake by that id for this caller."""


@dataclass(frozen=True)
class SubmissionRequest:
    upload_id: str
    challenge: str
    phase: str
    source_url: str | None = None
    license: str | None = None

    def fingerprint(self) -> str:
        """What a retry must repeat exactly: the body, canonically."""
        canonical = json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def upload_cap(image_size: int) -> int:
    """The largest archive a phase accepts: its `image_size` (the layers, decompressed),
    plus room for the archive's own headers and config (1%, at least 16 MiB)."""
    return image_size + max(image_size // 100, 16 << 20)


def phase_cap(session: Session, challenge_id: str, phase_slug: str) -> int:
    """The upload cap of a phase; an unknown challenge or phase is not found."""
    try:
        phase = find_phase(session, challenge_id, phase_slug)[1]
    except (SubmissionRefused, ChallengeError) as exc:
        raise NotFound(str(exc)) from None
    return upload_cap(phase.limits.image_size)


def check_key(key: str | None) -> str:
    if not key:
        raise EpreuveError("an Idempotency-Key header is required (any unique string, e.g. "
                           "a UUID): a retried request with it never makes a duplicate")
    if len(key) > MAX_KEY or not key.isprintable() or not key.isascii():
        raise EpreuveError(f"the Idempotency-Key must be at most {MAX_KEY} printable ASCII "
                           "characters")
    return key


def find_by_key(session: Session, token_id: int, key: str,
                request: SubmissionRequest) -> IntakeRow | None:
    """The intake a previous request with this key made, if the body is the same."""
    intake = session.scalar(select(IntakeRow).where(IntakeRow.token_id == token_id,
                                                    IntakeRow.idempotency_key == key))
    if intake is not None and intake.request_sha256 != request.fingerprint():
        raise IdempotencyKeyReused(
            f"the Idempotency-Key {key[:60]!r} was already used with another request "
            f"(intake {intake.id}): use a new key for a new submission")
    return intake


def open_intake(session: Session, *, token_id: int, team_id: int, key: str,
                request: SubmissionRequest, upload: Upload) -> tuple[IntakeRow, bool]:
    """A new intake for a whole upload, and True; or the one this key made, found late,
    and False. Flushes (the request commits)."""
    if not upload.complete:
        raise UploadIncomplete(f"upload {upload.id} has {upload.offset} of its "
                               f"{upload.length} bytes: finish it (HEAD, then PATCH) first")
    named = (upload.metadata.get("challenge"), upload.metadata.get("phase"))
    if named != (request.challenge, request.phase):
        raise Conflict(f"upload {upload.id} was made for {named[0]}/{named[1]}, not "
                       f"{request.challenge}/{request.phase}: upload again for that phase")
    taken = session.scalar(select(IntakeRow).where(IntakeRow.upload_id == upload.id))
    if taken is not None and (taken.token_id, taken.idempotency_key) == (token_id, key):
        return taken, False  # a racing retry of this very request committed it meanwhile
    if taken is not None:
        raise Conflict(f"upload {upload.id} was already submitted (intake {taken.id}): "
                       "an upload makes one submission")
    phase_cap(session, request.challenge, request.phase)  # the challenge and phase exist
    intake = IntakeRow(token_id=token_id, team_id=team_id, idempotency_key=key,
                       request_sha256=request.fingerprint(), upload_id=upload.id,
                       tar_sha256=upload.sha256, tar_bytes=upload.length,
                       challenge_id=request.challenge, phase_slug=request.phase,
                       source_url=request.source_url, license=request.license,
                       status=IntakeStatus.VALIDATING, stage="waiting")
    session.add(intake)
    session.flush()
    return intake, True


def intake_for(session: Session, intake_id: int, team_id: int | None,
               *, any_team: bool = False) -> IntakeRow:
    intake = session.get(IntakeRow, intake_id)
    if intake is None or not (any_team or intake.team_id == team_id):
        raise IntakeNotFound(f"no intake {intake_id}")
    return intake


def intake_view(session: Session, intake: IntakeRow) -> dict:
    """What a participant sees of an intake (and of the submission it became)."""
    submission = session.get(SubmissionRow, intake.submission_id) \
        if intake.submission_id else None
    return {
        "id": intake.id, "status": intake.status, "stage": intake.stage,
        "bytes_checked": intake.bytes_done, "bytes_total": intake.tar_bytes,
        "challenge": intake.challenge_id, "phase": intake.phase_slug,
        "upload_id": intake.upload_id, "archive_sha256": intake.tar_sha256,
        "reason": intake.reason, "message": intake.message,
        "submission_id": intake.submission_id,
        "submission_status": submission.status if submission else None,
        "created_at": intake.created_at.isoformat(),
        "updated_at": intake.updated_at.isoformat(),
    }


class _Taken(Exception):
    """Another thread or server process finished this intake first: roll back ours."""


class IntakeRunner:
    """The server's background validation: a small pool of threads in its process."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings,
                 store: DirectoryStore, *,
                 docker_client: Callable[[], docker.DockerClient] | None = None,
                 threads: int = 2):
        self.sessions = sessions
        self.settings = settings
        self.store = store
        self.docker_client = docker_client or _local_docker
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="intake")
        self._running: set[int] = set()
        self._lock = threading.Lock()

    def start(self, intake_id: int) -> None:
        with self._lock:
            if intake_id in self._running:
                return
            self._running.add(intake_id)
        self.pool.submit(self._run_logged, intake_id)

    def resume_pending(self) -> int:
        """After a restart: validate again the intakes a dead process left half done."""
        with self.sessions() as session:
            pending = session.scalars(select(IntakeRow.id).where(
                IntakeRow.status == IntakeStatus.VALIDATING)).all()
        for intake_id in pending:
            self.start(intake_id)
        return len(pending)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run_logged(self, intake_id: int) -> None:
        try:
            self.run(intake_id)
        except Exception:  # a thread's failure must not vanish: recorded on the intake
            log.exception("intake %s failed unexpectedly", intake_id)
            self._refuse(intake_id, FailureReason.INFRASTRUCTURE,
                         "the server failed while checking the image; submit it again")
        finally:
            with self._lock:
                self._running.discard(intake_id)

    def run(self, intake_id: int) -> None:
        with self.sessions() as session:
            intake = session.get(IntakeRow, intake_id)
            if intake is None or intake.status != IntakeStatus.VALIDATING:
                return
            _, phase = find_phase(session, intake.challenge_id, intake.phase_slug)
            team = session.get(TeamRow, intake.team_id)
        try:
            pinned = pin_tar(self.store.path(intake.tar_sha256), self.docker_client(),
                             store=self.store,
                             reference=f"upload {intake.upload_id[:12]} "
                                       f"(sha256 {intake.tar_sha256[:12]})",
                             max_bytes=upload_cap(phase.limits.image_size),
                             max_image_bytes=phase.limits.image_size,
                             work_dir=self._work_dir(),
                             progress=self._progress(intake_id, "checking"),
                             load_progress=self._progress(intake_id, "loading"))
        except ImageInvalid as exc:
            self._refuse(intake_id, FailureReason.IMAGE_INVALID, str(exc))
            return
        except docker.errors.DockerException as exc:
            self._refuse(intake_id, FailureReason.INFRASTRUCTURE,
                         f"the Docker Engine of the server failed ({exc}); submit again")
            return
        except ImageNotKept as exc:
            self._refuse(intake_id, FailureReason.INFRASTRUCTURE, str(exc))
            return
        with self.sessions() as session:
            try:
                submit(session, intake.challenge_id, intake.phase_slug, team.name, pinned,
                       source_url=intake.source_url, license_id=intake.license,
                       actor=f"api token {intake.token_id}",
                       before_commit=lambda row: self._link(session, intake_id, row))
                session.commit()  # the intake's edge: the submission and its intake together
            except _Taken:
                session.rollback()
            except SubmissionRefused as exc:
                session.rollback()
                self._refuse(intake_id, None, str(exc))

    def _work_dir(self):
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        return self.settings.work_dir

    @staticmethod
    def _link(session: Session, intake_id: int, submission: SubmissionRow) -> None:
        """In the submission's transaction: the intake still pending (locked where the
        database can) becomes accepted, else the submission is undone."""
        intake = session.scalar(select(IntakeRow).where(IntakeRow.id == intake_id)
                                .with_for_update().execution_options(populate_existing=True))
        if intake.status != IntakeStatus.VALIDATING:
            raise _Taken
        intake.status, intake.stage = IntakeStatus.ACCEPTED, None
        intake.submission_id, intake.updated_at = submission.id, utcnow()
        intake.bytes_done = intake.tar_bytes

    def _refuse(self, intake_id: int, reason: str | None, message: str) -> None:
        with self.sessions() as session:
            intake = session.get(IntakeRow, intake_id)
            if intake is None or intake.status != IntakeStatus.VALIDATING:
                return
            intake.status, intake.stage = IntakeStatus.REFUSED, None
            intake.reason, intake.message = reason, message[:4000]
            intake.updated_at = utcnow()
            session.commit()

    def _progress(self, intake_id: int, stage: str) -> Callable[[int, int | None], None]:
        """A progress callback that writes to the database only every few MiB."""
        written = {"done": -PROGRESS_STEP}

        def report(done: int, total: int | None) -> None:
            step = max(PROGRESS_STEP, (total or 0) // 50)
            if done - written["done"] < step and done != total:
                return
            written["done"] = done
            with self.sessions() as session:
                intake = session.get(IntakeRow, intake_id)
                if intake is not None and intake.status == IntakeStatus.VALIDATING:
                    intake.stage, intake.bytes_done = stage, done
                    intake.updated_at = utcnow()
                    session.commit()

        return report


def _local_docker() -> docker.DockerClient:
    return docker.DockerClient(base_url=os.environ.get("DOCKER_HOST")
                               or "unix:///var/run/docker.sock")
