"""Weights: sealed epochs, validators' submission reports, derived challenge tokens.

Revision ID: 0002_weights
Revises: 0001_registry
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_weights"
down_revision: str | None = "0001_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Tokens issued before this revision have no nonce: the master cannot present
    # them to a shim, so their challenges are FAILED until the token is rotated.
    op.add_column("challenges", sa.Column("token_nonce", sa.LargeBinary(16), nullable=True))
    op.create_table(
        "epochs",
        sa.Column("epoch", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("epoch_id", sa.String(64), nullable=False, unique=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registry_revision", sa.BigInteger(), nullable=False),
        sa.Column("metagraph_block", sa.BigInteger(), nullable=False),
        sa.Column("policy", sa.SmallInteger(), nullable=False),
        sa.Column("challenges_ok", sa.Integer(), nullable=False),
        sa.Column("challenges_failed", sa.Integer(), nullable=False),
        sa.Column("challenges_empty", sa.Integer(), nullable=False),
        sa.Column("burn_weight", sa.Float(), nullable=False),
        sa.Column("weight_count", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "submissions",
        sa.Column("validator_hotkey", sa.String(64), primary_key=True),
        sa.Column("report_id", sa.String(64), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.SmallInteger(), nullable=False),
        sa.Column("receive_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("admin_reported", sa.Boolean(), nullable=False),
        sa.Column("report", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_submissions_receive_time", "submissions", ["receive_time"])
    op.create_index("ix_submissions_epoch", "submissions", ["epoch", "validator_hotkey"])


def downgrade() -> None:
    op.drop_table("submissions")
    op.drop_table("epochs")
    with op.batch_alter_table("challenges") as batch:  # SQLite cannot drop columns in place
        batch.drop_column("token_nonce")
