"""Epochs: which master replica runs the epoch of each tempo.

On the tempo schedule every replica reaches the same tempo at about the same
block. The first to insert the tempo's row (its primary key is the block at
which the chain's epoch runs) collects and seals; the others leave that tempo
to it, so challenges are asked once per tempo and one vector is sealed for it.

Revision ID: 0004_epoch_tempos
Revises: 0003_edge
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_epoch_tempos"
down_revision: str | None = "0003_edge"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "epoch_tempos",
        sa.Column("tempo_end_block", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("claim_time", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("epoch_tempos")
