"""images.archive_sha256: the digest of the image's loadable copy in the image store

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # nullable: images accepted before the store have no kept archive
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("archive_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("archive_sha256")
