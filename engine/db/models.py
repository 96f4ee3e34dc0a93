"""What the engine remembers: SQLAlchemy 2 models. The schema changes only through Alembic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator

from engine.statuses import IntakeStatus, JobStatus, NodeState, SubmissionStatus


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON,
                                     datetime: UTCDateTime}


class ChallengeRow(Base):
    __tablename__ = "challenges"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    task: Mapped[str] = mapped_column(String(32))
    definition: Mapped[dict[str, Any]]  # the validated YAML, as JSON
    definition_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    phases: Mapped[list[PhaseRow]] = relationship(back_populates="challenge")


class PhaseRow(Base):
    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("challenge_id", "slug"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    challenge_id: Mapped[str] = mapped_column(ForeignKey("challenges.id"))
    slug: Mapped[str] = mapped_column(String(64))
    dataset_path: Mapped[str] = mapped_column(Text)
    dataset_version: Mapped[str] = mapped_column(String(64))
    case_ids: Mapped[list[Any]]
    frozen_at: Mapped[datetime | None]  # `challenge freeze`: its results never change after
    # an organiser published a final phase's leaderboard before it closes (engine/publication.py)
    leaderboard_published_at: Mapped[datetime | None]
    challenge: Mapped[ChallengeRow] = relationship(back_populates="phases")


class DatasetVersionRow(Base):
    """What a sealed dataset version held, kept after it is re-sealed: its cases in order and
    a digest of each case's input files (what a container saw), so that results computed
    on it can be told apart from the current version's and rescored where inputs match."""

    __tablename__ = "dataset_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)  # manifest sha256
    case_inputs: Mapped[dict[str, Any]]  # {case_id: sha256 of its input files}, case order
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class TeamRow(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImageRow(Base):
    """A submitted image, pinned: the daemon's image id, the tar's sha256 and its layers,
    and the digest of the loadable copy kept in the image store (None: accepted before)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[str] = mapped_column(String(80), unique=True)
    tar_sha256: Mapped[str | None] = mapped_column(String(64))
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    layers: Mapped[list[Any]]
    reference: Mapped[str] = mapped_column(Text)  # what the participant called it
    architecture: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _of_phase(context, column):
    """For a row written without its dataset version (a test, a tool): its phase's current
    one, the rule migration 0003 applied to existing rows. `submit` always sets it."""
    phase_id = context.get_current_parameters()["phase_id"]
    return context.connection.scalar(select(column).where(PhaseRow.id == phase_id))


class SubmissionRow(Base):
    __tablename__ = "submissions"
    __table_args__ = (Index("ix_submissions_phase_team_created", "phase_id", "team_id",
                            "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"))
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    image_pk: Mapped[int] = mapped_column(ForeignKey("images.id"))
    status: Mapped[str] = mapped_column(String(16), default=SubmissionStatus.QUEUED.value)
    reason: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    source_url: Mapped[str | None] = mapped_column(Text)
    license: Mapped[str | None] = mapped_column(String(100))
    prize_eligible: Mapped[bool] = mapped_column(default=True)
    prize_note: Mapped[str | None] = mapped_column(Text)
    counts_against_quota: Mapped[bool] = mapped_column(default=True)
    # the dataset version its results are computed on, and that version's cases (fixed at
    # submit time; changed only by a rescore)
    dataset_version: Mapped[str] = mapped_column(
        String(64), default=lambda context: _of_phase(context, PhaseRow.dataset_version))
    case_ids: Mapped[list[Any]] = mapped_column(
        default=lambda context: _of_phase(context, PhaseRow.case_ids))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    phase: Mapped[PhaseRow] = relationship()
    team: Mapped[TeamRow] = relationship()
    image: Mapped[ImageRow] = relationship()
    jobs: Mapped[list[JobRow]] = relationship(back_populates="submission",
                                              order_by="JobRow.id")


class IntakeRow(Base):
    """An uploaded image on its way to becoming a submission: created by the request,
    validated after it (outside it), then linked to the submission it became, or refused.
    Keyed by (token, Idempotency-Key): a retried request finds it instead of a duplicate."""

    __tablename__ = "intakes"
    __table_args__ = (UniqueConstraint("token_id", "idempotency_key"),
                      UniqueConstraint("upload_id"), Index("ix_intakes_status", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    token_id: Mapped[int]
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    idempotency_key: Mapped[str] = mapped_column(String(200))
    request_sha256: Mapped[str] = mapped_column(String(64))  # the body the key was used with
    upload_id: Mapped[str] = mapped_column(String(64))
    tar_sha256: Mapped[str] = mapped_column(String(64))
    tar_bytes: Mapped[int] = mapped_column(BigInteger)  # multi-GB: past int4
    challenge_id: Mapped[str] = mapped_column(String(64))
    phase_slug: Mapped[str] = mapped_column(String(64))
    source_url: Mapped[str | None] = mapped_column(Text)
    license: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=IntakeStatus.VALIDATING.value)
    stage: Mapped[str | None] = mapped_column(String(16))  # checking | loading
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    submission_id: Mapped[int | None] = mapped_column(ForeignKey("submissions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """One container run over a shard of cases, leased to one worker at a time."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_priority", "status", "priority", "id"),
                      # fair share: a submission's queued jobs, and recent service
                      Index("ix_jobs_submission_status", "submission_id", "status"),
                      Index("ix_jobs_finished_at", "finished_at"),
                      # the waiting submissions, read from the index alone
                      Index("ix_jobs_queued", "priority", "submission_id", "gpus",
                            postgresql_where=text("status = 'queued'"),
                            sqlite_where=text("status = 'queued'")))

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    kind: Mapped[str] = mapped_column(String(16))  # JobKind: smoke | main
    case_ids: Mapped[list[Any]]
    dataset_version: Mapped[str] = mapped_column(  # the inputs it must run on
        String(64), default=lambda context: context.connection.scalar(
            select(SubmissionRow.dataset_version).where(
                SubmissionRow.id == context.get_current_parameters()["submission_id"])))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(default=0)  # smaller first: smoke jobs jump the queue
    gpus: Mapped[int] = mapped_column(default=0)  # whole GPUs the job needs
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    leased_at: Mapped[datetime | None]  # the last lease: fair share's round-robin
    heartbeat_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    run_result: Mapped[dict[str, Any] | None]
    # a completed run waiting for (or under) scoring: what the node reported and where its
    # outputs are (engine/worker/scorer.py); a scorer's lease: lease_owner/lease_expires_at
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    scorings: Mapped[int] = mapped_column(default=0)  # scoring leases taken on this outcome
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))  # its attempt's node
    submission: Mapped[SubmissionRow] = relationship(back_populates="jobs")


class CaseResultRow(Base):
    """One case of one submission: written once, in the transaction that finishes its job."""

    __tablename__ = "case_results"
    __table_args__ = (UniqueConstraint("submission_id", "case_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    case_id: Mapped[str] = mapped_column(String(128))
    valid: Mapped[bool]
    reason: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]]  # {"dice[1]": 0.93, ...}
    runtime_seconds: Mapped[float | None]
    runtime_exact: Mapped[bool]  # one case per run: exact; otherwise the run's time shared
    output_sha256: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReproductionRow(Base):
    """A re-run of a submission compared case by case with its recorded results, which it
    never replaces: of the pinned image (`pinned`) or of one built from its published
    source (`built`, the open-source prize check)."""

    __tablename__ = "reproductions"
    __table_args__ = (Index("ix_reproductions_submission", "submission_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    source: Mapped[str] = mapped_column(String(16))  # pinned | built
    image_id: Mapped[str] = mapped_column(String(80))  # the image that was re-run
    dataset_version: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # engine.statuses.Verdict
    summary: Mapped[dict[str, Any]]  # largest difference, metrics moved, effect on the rank
    cases: Mapped[list[Any]]  # per case: verdict, recorded and reproduced values
    runs: Mapped[list[Any]]  # each shard's RunResult
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AggregateRow(Base):
    __tablename__ = "aggregates"
    __table_args__ = (UniqueConstraint("submission_id", "metric"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    metric: Mapped[str] = mapped_column(String(100))  # "dice[1]"
    summary: Mapped[dict[str, Any]]  # mean, median, std, quantiles, n, n_failed, CI


class NodeRow(Base):
    """A machine that runs jobs, as it described itself (engine/nodes.py): seen by
    organisers, marked lost when its heartbeats stop."""

    __tablename__ = "nodes"
    __table_args__ = (Index("ix_nodes_token_name", "token_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63))  # chosen by the node: validated
    token_id: Mapped[int | None] = mapped_column(ForeignKey("tokens.id"))  # None: local
    gpu_slots: Mapped[int] = mapped_column(default=0)
    cpu_slots: Mapped[int] = mapped_column(default=1)
    gpus: Mapped[list[Any]] = mapped_column(default=list)  # [{uuid, model, driver, memory}]
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # provenance.node_facts
    gpu_samples: Mapped[dict[str, Any]] = mapped_column(default=dict)  # latest, per GPU uuid
    state: Mapped[str] = mapped_column(String(16), default=NodeState.ACTIVE.value)
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(default=utcnow)


class EventRow(Base):
    """Append-only history: every state change, with who or what made it and why."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_entity", "entity", "entity_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    entity: Mapped[str] = mapped_column(String(16))  # submission | job
    entity_id: Mapped[int]
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str | None] = mapped_column(Text)


class TokenRow(Base):
    """An API token: only the sha256 of its secret is kept; the prefix is for display.
    A participant token belongs to a team; organiser and reviewer tokens name the
    challenges they may manage or read in `challenge_ids`."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(16))  # engine.tokens.Role
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"))
    challenge_ids: Mapped[list[Any]]
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    team: Mapped[TeamRow | None] = relationship()
