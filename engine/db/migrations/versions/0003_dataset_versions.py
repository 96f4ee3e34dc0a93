"""dataset versions per submission and job; the case inputs of every version kept

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-30

Existing submissions and jobs are filled from their phase's current dataset version and
case list (the only version known). The current version of each phase is recorded with its
per-case input digests when its manifest is still on disk at the phase's path.
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("case_inputs", sa.JSON(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dataset_version", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("case_ids", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dataset_version", sa.String(length=64), nullable=True))
    _fill_existing_rows()
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.alter_column("dataset_version", existing_type=sa.String(length=64),
                              nullable=False)
        batch_op.alter_column("case_ids", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("dataset_version", existing_type=sa.String(length=64),
                              nullable=False)


def _fill_existing_rows() -> None:
    bind = op.get_bind()
    phases = sa.table("phases", sa.column("id"), sa.column("dataset_path"),
                      sa.column("dataset_version"), sa.column("case_ids", sa.JSON()))
    submissions = sa.table("submissions", sa.column("id"), sa.column("phase_id"),
                           sa.column("dataset_version"), sa.column("case_ids", sa.JSON()))
    jobs = sa.table("jobs", sa.column("submission_id"), sa.column("dataset_version"))
    versions = sa.table("dataset_versions", sa.column("version"),
                        sa.column("case_inputs", sa.JSON()), sa.column("recorded_at"))
    recorded = set()
    for phase in bind.execute(sa.select(phases)).all():
        bind.execute(submissions.update().where(submissions.c.phase_id == phase.id).values(
            dataset_version=phase.dataset_version, case_ids=phase.case_ids))
        digests = _case_inputs_on_disk(phase.dataset_path, phase.dataset_version)
        if digests is not None and phase.dataset_version not in recorded:
            bind.execute(versions.insert().values(version=phase.dataset_version,
                                                  case_inputs=digests,
                                                  recorded_at=datetime.now(UTC)))
            recorded.add(phase.dataset_version)
    for submission in bind.execute(sa.select(submissions)).all():
        bind.execute(jobs.update().where(jobs.c.submission_id == submission.id).values(
            dataset_version=submission.dataset_version))


def _case_inputs_on_disk(path: str, version: str) -> dict | None:
    """The per-case input digests of the manifest at `path`, if it is still `version`
    (otherwise that version's inputs are not known: its submissions need a re-run to be
    rescored)."""
    from engine.datasets import case_input_digests

    try:
        data = (Path(path) / "manifest.json").read_bytes()
        if hashlib.sha256(data).hexdigest() != version:
            return None
        return case_input_digests(json.loads(data))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("dataset_version")
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_column("case_ids")
        batch_op.drop_column("dataset_version")
    op.drop_table("dataset_versions")
