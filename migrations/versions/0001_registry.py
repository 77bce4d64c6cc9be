"""The challenge registry: challenges, the event log and its head.

Revision ID: 0001_registry
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_registry"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# json, not jsonb: it keeps numbers as written (see master.db.models).
_json = sa.JSON()


def upgrade() -> None:
    state = op.create_table(
        "registry_state",
        sa.Column("id", sa.SmallInteger(), primary_key=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("compacted_revision", sa.BigInteger(), nullable=False),
        sa.Column("history_id", sa.String(32), nullable=False),
    )
    op.bulk_insert(
        state, [{"id": 1, "revision": 0, "compacted_revision": 0, "history_id": uuid.uuid4().hex}]
    )
    op.create_table(
        "challenges",
        sa.Column("slug", sa.String(40), primary_key=True),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("emission_share_ppb", sa.BigInteger(), nullable=False),
        sa.Column("spec", _json, nullable=False),
        sa.Column("token_sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("token_issue_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_reason", sa.String(512), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("create_revision", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_challenges_status", "challenges", ["status"])
    op.create_table(
        "registry_events",
        sa.Column("revision", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("slug", sa.String(40), nullable=False),
        sa.Column("type", sa.SmallInteger(), nullable=False),
        sa.Column("challenge", _json, nullable=False),
        sa.Column("commit_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_events")
    op.drop_index("ix_challenges_status", table_name="challenges")
    op.drop_table("challenges")
    op.drop_table("registry_state")
