"""Schema of the control-plane database, as SQLAlchemy 2 models.

The schema is created and changed only by the Alembic migrations in
``migrations/``; these models describe it for queries. A test checks that the
migrated schema and these models agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Plain `json` on PostgreSQL, not `jsonb`: json keeps the text as written, so a
# float stays a float (jsonb would hand 1e20 back as an integer) and values
# round-trip exactly as the API received them.
JsonType = JSON()


class Base(DeclarativeBase):
    pass


class RegistryState(Base):
    """One row (id = 1): the head of the registry's event log.

    Every registry write updates this row first. On PostgreSQL the row lock
    serializes writers, which makes revisions gap-free and equal to commit order
    (a watcher that has seen revision N can never later see a smaller one
    appear) and makes the emission-sum check race-free across master replicas.
    """

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Events with revision <= compacted_revision have been deleted.
    compacted_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Random id of this event history; a watcher from another database resyncs.
    history_id: Mapped[str] = mapped_column(String(32), nullable=False)


class ChallengeRow(Base):
    __tablename__ = "challenges"

    slug: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    emission_share_ppb: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The client-settable fields (rules.spec_to_dict), the share included.
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    token_sha256: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    # Nonce the token was derived with (master.registry.tokens); NULL for tokens
    # issued before derivation existed, which the master cannot present.
    token_nonce: Mapped[bytes | None] = mapped_column(LargeBinary(16), nullable=True)
    token_issue_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status_reason: Mapped[str] = mapped_column(String(512), nullable=False)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    create_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (Index("ix_challenges_status", "status"),)


class RegistryEventRow(Base):
    """The registry's event log; WatchRegistry replays it."""

    __tablename__ = "registry_events"

    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    slug: Mapped[str] = mapped_column(String(40), nullable=False)
    # 1 = put, 2 = delete (RegistryEvent.Type numbers).
    type: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    # The challenge after the change (before it, for a delete), without the token.
    challenge: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    commit_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class EpochRow(Base):
    """One sealed epoch: summary columns for listing, the full record as protobuf.

    ``vector`` is the signed ``WeightVector`` and ``body`` the ``Epoch`` (vector
    included), both serialized deterministically when sealed and never
    rewritten, so every read returns the bytes that were signed.
    """

    __tablename__ = "epochs"

    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    epoch_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    registry_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    metagraph_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    policy: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    challenges_ok: Mapped[int] = mapped_column(Integer, nullable=False)
    challenges_failed: Mapped[int] = mapped_column(Integer, nullable=False)
    challenges_empty: Mapped[int] = mapped_column(Integer, nullable=False)
    burn_weight: Mapped[float] = mapped_column(Float, nullable=False)
    weight_count: Mapped[int] = mapped_column(Integer, nullable=False)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class EpochTempoRow(Base):
    """The master replica that runs the epoch of one tempo (the tempo schedule).

    ``tempo_end_block`` is the block at which the chain runs the subnet's epoch, so
    it names a tempo whatever the tempo length was. The primary key makes the claim
    atomic across replicas: the first INSERT wins; a holder whose epoch could not be
    sealed deletes its row so another replica may take the tempo.
    """

    __tablename__ = "epoch_tempos"

    tempo_end_block: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    holder: Mapped[str] = mapped_column(String(128), nullable=False)
    claim_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class SubmissionRow(Base):
    """A validator's report about one epoch (Weights.ReportSubmission)."""

    __tablename__ = "submissions"

    validator_hotkey: Mapped[str] = mapped_column(String(64), primary_key=True)
    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, nullable=False)
    outcome: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    receive_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    admin_reported: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # The SubmissionReport as sent, serialized deterministically (retries compare it).
    report: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)

    __table_args__ = (
        Index("ix_submissions_receive_time", "receive_time"),
        Index("ix_submissions_epoch", "epoch", "validator_hotkey"),
    )


class EdgeNonceRow(Base):
    """A signed miner request the edge accepted: its ``(hotkey, nonce)``.

    The primary key is the replay check: claiming a nonce is one INSERT, and
    the database refuses a second one whichever master replica attempts it.
    Rows are useless once the nonce is outside the freshness window and are
    pruned after ``expire_time``.
    """

    __tablename__ = "edge_nonces"

    hotkey: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (Index("ix_edge_nonces_expire_time", "expire_time"),)
