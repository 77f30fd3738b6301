"""Initial gallery schema: images, tags and the FTS5 prompt index kept in sync by triggers.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("technique", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False, server_default=""),
        sa.Column("prompt", sa.Text, nullable=False, server_default=""),
        sa.Column("negative_prompt", sa.Text, nullable=False, server_default=""),
        sa.Column("seed", sa.BigInteger, nullable=True),
        sa.Column("steps", sa.Integer, nullable=True),
        sa.Column("guidance", sa.Float, nullable=True),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("scheduler", sa.String(128), nullable=True),
        sa.Column("settings", sa.Text, nullable=False, server_default="{}"),
        sa.Column("image_path", sa.String(255), nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("images.id", ondelete="SET NULL"), nullable=True),
        sa.Column("duration_s", sa.Float, nullable=False, server_default="0"),
        # Microseconds since the Unix epoch, UTC: sorts and compares as an integer.
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("favourite", sa.Boolean, nullable=False, server_default=sa.false()),
        sqlite_autoincrement=True,  # ids are never reused (the FTS index and lineage rely on it)
    )
    op.create_index("ix_images_created", "images", ["created_at"])
    op.create_index("ix_images_model_created", "images", ["model", "created_at"])
    op.create_index("ix_images_technique_created", "images", ["technique", "created_at"])
    op.create_index("ix_images_favourite_created", "images", ["favourite", "created_at"])
    op.create_index("ix_images_parent", "images", ["parent_id"])

    op.create_table(
        "image_tags",
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_image_tags_tag", "image_tags", ["tag"])

    op.execute(
        "CREATE VIRTUAL TABLE images_fts USING fts5("
        "prompt, negative_prompt, content='images', content_rowid='id', "
        "tokenize='unicode61 remove_diacritics 2')"
    )
    op.execute(
        "CREATE TRIGGER images_fts_ai AFTER INSERT ON images BEGIN "
        "INSERT INTO images_fts(rowid, prompt, negative_prompt) "
        "VALUES (new.id, new.prompt, new.negative_prompt); END"
    )
    op.execute(
        "CREATE TRIGGER images_fts_ad AFTER DELETE ON images BEGIN "
        "INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt) "
        "VALUES ('delete', old.id, old.prompt, old.negative_prompt); END"
    )
    op.execute(
        "CREATE TRIGGER images_fts_au AFTER UPDATE OF prompt, negative_prompt ON images BEGIN "
        "INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt) "
        "VALUES ('delete', old.id, old.prompt, old.negative_prompt); "
        "INSERT INTO images_fts(rowid, prompt, negative_prompt) "
        "VALUES (new.id, new.prompt, new.negative_prompt); END"
    )


def downgrade() -> None:
    for trigger in ("images_fts_au", "images_fts_ad", "images_fts_ai"):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.execute("DROP TABLE IF EXISTS images_fts")
    op.drop_table("image_tags")
    op.drop_table("images")
