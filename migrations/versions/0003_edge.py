"""Edge: nonces of signed miner requests the edge has accepted.

Every master replica that answers Envoy's ext_authz checks claims a request's
``(hotkey, nonce)`` here; the primary key makes the claim atomic across
replicas, so a replayed request is refused whichever replica sees it.

Revision ID: 0003_edge
Revises: 0002_weights
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_edge"
down_revision: str | None = "0002_weights"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "edge_nonces",
        sa.Column("hotkey", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
    )
    # Pruning deletes by expiry.
    op.create_index("ix_edge_nonces_expire_time", "edge_nonces", ["expire_time"])


def downgrade() -> None:
    op.drop_table("edge_nonces")
