"""Evaluations: each run's settings, its numbers, and the gallery items of its figures.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),  # µs since the epoch, UTC
        sa.Column("settings", sa.Text, nullable=False),  # the EvaluationSettings dict
        sa.Column("results", sa.Text, nullable=False),  # one key per metric
        sa.Column("figure_ids", sa.Text, nullable=False, server_default="[]"),  # gallery items: grid, plots
        sa.Column("duration_s", sa.Float, nullable=False, server_default="0"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_evaluations_created", "evaluations", ["created_at"])


def downgrade() -> None:
    op.drop_table("evaluations")
