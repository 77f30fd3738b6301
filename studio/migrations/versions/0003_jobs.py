"""Jobs: long work (evaluations, training) run off the request path, with its progress.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(64), nullable=False),  # "evaluation", "training", ...
        sa.Column("status", sa.String(16), nullable=False),  # queued, running, done, failed, ...
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("metrics", sa.Text, nullable=False, server_default="[]"),  # [{"step": 10, "loss": 0.1}]
        sa.Column("samples", sa.Text, nullable=False, server_default="[]"),  # image paths, newest last
        sa.Column("out_dir", sa.Text, nullable=False, server_default=""),
        sa.Column("settings", sa.Text, nullable=False, server_default="{}"),  # the Settings dict
        sa.Column("result", sa.Text, nullable=False, server_default="{}"),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.String(128), nullable=False, server_default=""),  # host:pid:start
        sa.Column("created_at", sa.BigInteger, nullable=False),  # µs since the epoch, UTC
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_jobs_kind", "jobs", ["kind", "id"])
    op.create_index("ix_jobs_status", "jobs", ["status"])


def downgrade() -> None:
    op.drop_table("jobs")
