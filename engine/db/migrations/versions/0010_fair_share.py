"""fair share: jobs.leased_at (round-robin by last lease); indexes for a submission's queued
jobs, for recent service, and a partial one over queued jobs (the waiting submissions)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_submission_status", "jobs", ["submission_id", "status"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    queued = sa.text("status = 'queued'")
    op.create_index("ix_jobs_queued", "jobs", ["priority", "submission_id", "gpus"],
                    postgresql_where=queued, sqlite_where=queued)


def downgrade() -> None:
    op.drop_index("ix_jobs_queued", table_name="jobs")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_submission_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("leased_at")
