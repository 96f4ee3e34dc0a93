"""nodes: the node registry; jobs.node_id (the node running the job's attempt)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("gpu_slots", sa.Integer(), nullable=False),
        sa.Column("cpu_slots", sa.Integer(), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("gpu_samples", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["tokens.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_nodes_token_name", "nodes", ["token_id", "name"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("node_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_jobs_node_id", "nodes", ["node_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_node_id", type_="foreignkey")
        batch.drop_column("node_id")
    op.drop_index("ix_nodes_token_name", table_name="nodes")
    op.drop_table("nodes")
