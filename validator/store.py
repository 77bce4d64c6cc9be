"""The agent's own store: stream positions, one row per epoch, and the report outbox.

It is what makes the agent safe to restart. SQLite (one file, the default) or
PostgreSQL, through SQLAlchemy; the schema is small and created by the agent itself
(``validator_state.schema_version`` records its version; an agent refuses a store
written by a newer schema). It is not the master's database and shares nothing with it.

* ``validator_state``: the position of each stream (so a restart resumes where it left
  off) and the newest vector claimed for submission (the "newer than" check survives
  restarts).
* ``validator_epochs``: one row per authentic epoch, keyed by ``epoch_id``. A row moves
  ``queued`` (verified, waiting for the submitter; the vector is kept with it) ->
  ``pending`` (claimed: a submission may be in flight) -> ``done`` (its final outcome).
  Every move is a single conditional UPDATE, so an epoch is claimed at most once, and a
  row that already exists is never inserted again: an epoch delivered twice (a replay,
  a snapshot after a resync) is recognised and left alone. Vectors that fail the
  signature check get no row: their epoch id cannot be trusted and must not block the
  real epoch of that id.
* ``validator_reports``: every outcome as the exact ``SubmissionReport`` bytes to send,
  written in the same transaction as the outcome (an outbox), and kept until the master
  acknowledges it. Re-sending the same bytes is what makes retries idempotent.
* ``validator_challenges``: the registry as the ``WatchRegistry`` stream last left it.

A ``pending`` row found at start-up belongs to a submission the agent was running when
it stopped without finishing (a crash, a kill): whether its extrinsic reached the chain
is unknown. The agent never submits that epoch again; it closes the row as ``FAILED``
with that explanation (see docs/validators.md).

Only one agent may use a store at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from platform_common.config import check_database_url
from platform_network.v1 import registry_pb2, weights_pb2
from validator.verify import Position, is_newer

SCHEMA_VERSION = 1

QUEUED = "queued"
PENDING = "pending"
DONE = "done"

REPORT_QUEUED = "queued"
REPORT_SENT = "sent"
REPORT_DROPPED = "dropped"

metadata = MetaData()

state_table = Table(
    "validator_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

epochs_table = Table(
    "validator_epochs",
    metadata,
    Column("epoch_id", String(64), primary_key=True),
    Column("history_id", String(64), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("create_time_ns", BigInteger, nullable=False),
    Column("expire_time_ns", BigInteger, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    # The serialized vector while the row is queued or pending; cleared once done.
    Column("vector", LargeBinary, nullable=True),
    Column("outcome", Integer, nullable=True),
    Column("block", BigInteger, nullable=False, default=0),
    Column("extrinsic_hash", String(66), nullable=False, default=""),
    Column("message", Text, nullable=False, default=""),
    Column("update_time_ns", BigInteger, nullable=False),
)

reports_table = Table(
    "validator_reports",
    metadata,
    Column("report_id", String(64), primary_key=True),
    Column("create_time_ns", BigInteger, nullable=False, index=True),
    Column("epoch", BigInteger, nullable=False),
    Column("epoch_id", String(64), nullable=False),
    Column("outcome", Integer, nullable=False),
    Column("report", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=False, default=""),
)

challenges_table = Table(
    "validator_challenges",
    metadata,
    Column("slug", String(64), primary_key=True),
    Column("challenge", LargeBinary, nullable=False),
)


class StoreError(Exception):
    """The store cannot be used (written by a newer schema)."""


@dataclass(frozen=True)
class Cursor:
    """A stream position: the history it belongs to and the revision (or epoch) applied."""

    history_id: str
    revision: int


OutcomeValue: TypeAlias = weights_pb2.SubmissionOutcome.ValueType


@dataclass(frozen=True)
class Result:
    """The outcome of one epoch, as stored and reported."""

    outcome: OutcomeValue
    message: str
    block: int = 0
    extrinsic_hash: str = ""


@dataclass(frozen=True)
class EpochRecord:
    epoch_id: str
    history_id: str
    epoch: int
    state: str
    outcome: OutcomeValue | None
    block: int
    extrinsic_hash: str
    message: str
    vector: weights_pb2.WeightVector | None


@dataclass(frozen=True)
class StoredReport:
    report_id: str
    report: weights_pb2.SubmissionReport
    state: str
    attempts: int
    last_error: str


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url`` with what each backend needs."""
    if check_database_url(url) == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _tune_sqlite(engine)
        return engine
    return create_async_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True)


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # SQLAlchemy, not the driver, decides where transactions begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE: take the write lock at the start, so two transactions never
        # both read and then fail to upgrade their lock.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert_epoch: Any = dialect.insert(epochs_table).on_conflict_do_nothing()
        self._insert_state: Any = dialect.insert(state_table)

    @classmethod
    async def open(cls, url: str) -> Store:
        """Open (creating its tables if needed) the store at ``url``."""
        engine = create_engine(url)
        store = cls(engine)
        try:
            await store._prepare()
        except BaseException:
            await engine.dispose()
            raise
        return store

    @property
    def backend(self) -> str:
        return str(self._engine.dialect.name)

    async def _prepare(self) -> None:
        async with self._engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with self._engine.begin() as conn:
            found = await _get(conn, "schema_version")
            if found is None:
                await self._put(conn, "schema_version", str(SCHEMA_VERSION))
            elif int(found) > SCHEMA_VERSION:
                raise StoreError(
                    f"the store has schema version {found}, newer than this agent's "
                    f"{SCHEMA_VERSION}: upgrade the agent or use another --database-url"
                )

    async def close(self) -> None:
        await self._engine.dispose()

    # -- state ------------------------------------------------------------------------

    async def _put(self, conn: AsyncConnection, key: str, value: str) -> None:
        statement = self._insert_state.values(key=key, value=value)
        statement = statement.on_conflict_do_update(
            index_elements=[state_table.c.key], set_={"value": value}
        )
        await conn.execute(statement)

    async def cursor(self, stream: str) -> Cursor | None:
        """Where ``stream`` ("weights" or "registry") resumes from; None for a first start."""
        async with self._engine.connect() as conn:
            raw = await _get(conn, f"cursor.{stream}")
        if raw is None:
            return None
        data = json.loads(raw)
        return Cursor(str(data["history_id"]), int(data["revision"]))

    async def _save_cursor(self, conn: AsyncConnection, stream: str, cursor: Cursor) -> None:
        value = json.dumps({"history_id": cursor.history_id, "revision": cursor.revision})
        await self._put(conn, f"cursor.{stream}", value)

    async def save_cursor(self, stream: str, cursor: Cursor) -> None:
        async with self._engine.begin() as conn:
            await self._save_cursor(conn, stream, cursor)

    async def last_claimed(self) -> Position | None:
        """The newest vector ever claimed for submission."""
        async with self._engine.connect() as conn:
            return await _last_claimed(conn)

    # -- epochs -----------------------------------------------------------------------

    async def epoch(self, epoch_id: str) -> EpochRecord | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(epochs_table).where(epochs_table.c.epoch_id == epoch_id))
            ).first()
        return None if row is None else _record(row._mapping)

    async def epochs(self) -> list[EpochRecord]:
        """Every epoch row, oldest first (by create time)."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(epochs_table).order_by(
                    epochs_table.c.create_time_ns, epochs_table.c.epoch_id
                )
            )
            return [_record(row._mapping) for row in rows]

    async def accept(self, vector: weights_pb2.WeightVector, cursor: Cursor | None = None) -> bool:
        """Queue a verified vector for submission, and move the weights stream to
        ``cursor`` in the same transaction. False (nothing queued) when the epoch is
        already known."""
        async with self._engine.begin() as conn:
            inserted = await self._insert(conn, vector, QUEUED, None, vector.SerializeToString())
            if cursor is not None:
                await self._save_cursor(conn, "weights", cursor)
        return inserted

    async def record(
        self,
        vector: weights_pb2.WeightVector,
        result: Result,
        report: weights_pb2.SubmissionReport,
        cursor: Cursor | None = None,
    ) -> bool:
        """Store the final outcome of an authentic vector that is not submitted, with its
        report, and move the weights stream to ``cursor``. False (nothing stored, no
        report) when the epoch is already known."""
        async with self._engine.begin() as conn:
            inserted = await self._insert(conn, vector, DONE, result, None)
            if inserted:
                await _add_report(conn, report)
            if cursor is not None:
                await self._save_cursor(conn, "weights", cursor)
        return inserted

    async def record_inauthentic(
        self, report: weights_pb2.SubmissionReport, cursor: Cursor | None = None
    ) -> None:
        """Store the report about a vector whose signature failed (no epoch row)."""
        async with self._engine.begin() as conn:
            await _add_report(conn, report)
            if cursor is not None:
                await self._save_cursor(conn, "weights", cursor)

    async def _insert(
        self,
        conn: AsyncConnection,
        vector: weights_pb2.WeightVector,
        state: str,
        result: Result | None,
        blob: bytes | None,
    ) -> bool:
        row = {
            "epoch_id": vector.epoch_id,
            "history_id": vector.history_id,
            "epoch": vector.epoch,
            "create_time_ns": vector.create_time.ToNanoseconds(),
            "expire_time_ns": vector.expire_time.ToNanoseconds(),
            "state": state,
            "vector": blob,
            "outcome": None if result is None else result.outcome,
            "block": 0 if result is None else result.block,
            "extrinsic_hash": "" if result is None else result.extrinsic_hash,
            "message": "" if result is None else result.message,
            "update_time_ns": time.time_ns(),
        }
        outcome = await conn.execute(self._insert_epoch, row)
        return bool(outcome.rowcount == 1)

    async def queued(self) -> list[weights_pb2.WeightVector]:
        """The vectors waiting for the submitter, newest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(epochs_table.c.vector)
                .where(epochs_table.c.state == QUEUED)
                .order_by(epochs_table.c.create_time_ns.desc(), epochs_table.c.epoch.desc())
            )
            return [weights_pb2.WeightVector.FromString(row.vector) for row in rows]

    async def last_submitted_epoch(self) -> int:
        """The newest epoch set (or committed) on chain by this validator; 0 for none."""
        done = (
            weights_pb2.SUBMISSION_OUTCOME_SUBMITTED,
            weights_pb2.SUBMISSION_OUTCOME_COMMITTED,
        )
        async with self._engine.connect() as conn:
            newest = await conn.scalar(
                select(func.max(epochs_table.c.epoch)).where(epochs_table.c.outcome.in_(done))
            )
            return int(newest or 0)

    async def pending(self) -> list[EpochRecord]:
        """Epochs claimed for submission and never finished."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(epochs_table).where(epochs_table.c.state == PENDING))
            return [_record(row._mapping) for row in rows]

    async def claim(self, vector: weights_pb2.WeightVector) -> str:
        """Take a queued epoch for submission: "claimed", or why not: "taken" (no longer
        queued) or "not_newer" (an epoch as new or newer was claimed before)."""
        position = Position.of(vector)
        async with self._engine.begin() as conn:
            raw = await _get(conn, "last_claimed")
            last = _position(raw)
            # An epoch handed back by unclaim() may be claimed again.
            again = raw is not None and json.loads(raw).get("epoch_id") == vector.epoch_id
            if not again and not is_newer(position, last):
                return "not_newer"
            moved = await conn.execute(
                update(epochs_table)
                .where(
                    epochs_table.c.epoch_id == vector.epoch_id,
                    epochs_table.c.state == QUEUED,
                )
                .values(state=PENDING, update_time_ns=time.time_ns())
            )
            if moved.rowcount != 1:
                return "taken"
            value = json.dumps(
                {
                    "epoch_id": vector.epoch_id,
                    "history_id": position.history_id,
                    "epoch": position.epoch,
                    "create_time_ns": position.create_time_ns,
                }
            )
            await self._put(conn, "last_claimed", value)
        return "claimed"

    async def unclaim(self, epoch_id: str) -> bool:
        """Hand a pending epoch back to the queue: only for a submission stopped before
        any extrinsic was sent (a shutdown during a wait), so that a restarted agent
        submits it if it is still fresh."""
        async with self._engine.begin() as conn:
            moved = await conn.execute(
                update(epochs_table)
                .where(epochs_table.c.epoch_id == epoch_id, epochs_table.c.state == PENDING)
                .values(state=QUEUED, update_time_ns=time.time_ns())
            )
        return bool(moved.rowcount == 1)

    async def finish(
        self, epoch_id: str, result: Result, report: weights_pb2.SubmissionReport
    ) -> bool:
        """Close a queued or pending epoch with its outcome and queue its report; False
        when it was already closed."""
        async with self._engine.begin() as conn:
            moved = await conn.execute(
                update(epochs_table)
                .where(
                    epochs_table.c.epoch_id == epoch_id,
                    epochs_table.c.state.in_((QUEUED, PENDING)),
                )
                .values(
                    state=DONE,
                    vector=None,
                    outcome=result.outcome,
                    block=result.block,
                    extrinsic_hash=result.extrinsic_hash,
                    message=result.message,
                    update_time_ns=time.time_ns(),
                )
            )
            if moved.rowcount != 1:
                return False
            await _add_report(conn, report)
        return True

    # -- reports ----------------------------------------------------------------------

    async def unsent_reports(self, limit: int = 32) -> list[StoredReport]:
        """Reports not yet acknowledged by the master, oldest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(reports_table)
                .where(reports_table.c.state == REPORT_QUEUED)
                .order_by(reports_table.c.create_time_ns, reports_table.c.report_id)
                .limit(limit)
            )
            return [_stored_report(row._mapping) for row in rows]

    async def count_unsent_reports(self) -> int:
        """How many reports wait for the master's acknowledgement."""
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).where(reports_table.c.state == REPORT_QUEUED)
            )
            return int(count or 0)

    async def reports(self) -> list[StoredReport]:
        """Every report, oldest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(reports_table).order_by(
                    reports_table.c.create_time_ns, reports_table.c.report_id
                )
            )
            return [_stored_report(row._mapping) for row in rows]

    async def mark_report(self, report_id: str, state: str, error: str = "") -> None:
        """Record one delivery attempt: its new state and the error, if any."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(reports_table)
                .where(reports_table.c.report_id == report_id)
                .values(
                    state=state,
                    attempts=reports_table.c.attempts + 1,
                    last_error=error[:2048],
                )
            )

    # -- registry ---------------------------------------------------------------------

    async def apply_registry(
        self,
        cursor: Cursor,
        *,
        snapshot: list[registry_pb2.Challenge] | None = None,
        put: registry_pb2.Challenge | None = None,
        delete_slug: str | None = None,
    ) -> None:
        """Apply one WatchRegistry message and its cursor in one transaction."""
        async with self._engine.begin() as conn:
            if snapshot is not None:
                await conn.execute(delete(challenges_table))
                if snapshot:
                    await conn.execute(
                        challenges_table.insert(),
                        [{"slug": c.slug, "challenge": c.SerializeToString()} for c in snapshot],
                    )
            if put is not None or delete_slug is not None:
                slug = put.slug if put is not None else delete_slug
                await conn.execute(delete(challenges_table).where(challenges_table.c.slug == slug))
                if put is not None:
                    await conn.execute(
                        challenges_table.insert(),
                        {"slug": put.slug, "challenge": put.SerializeToString()},
                    )
            await self._save_cursor(conn, "registry", cursor)

    async def challenges(self) -> list[registry_pb2.Challenge]:
        """The registry as last applied, in slug order."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(challenges_table.c.challenge).order_by(challenges_table.c.slug)
            )
            return [registry_pb2.Challenge.FromString(row.challenge) for row in rows]


async def _get(conn: AsyncConnection, key: str) -> str | None:
    row = (await conn.execute(select(state_table.c.value).where(state_table.c.key == key))).first()
    return None if row is None else str(row.value)


async def _last_claimed(conn: AsyncConnection) -> Position | None:
    return _position(await _get(conn, "last_claimed"))


def _position(raw: str | None) -> Position | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return Position(str(data["history_id"]), int(data["epoch"]), int(data["create_time_ns"]))


async def _add_report(conn: AsyncConnection, report: weights_pb2.SubmissionReport) -> None:
    await conn.execute(
        reports_table.insert(),
        {
            "report_id": report.report_id,
            "create_time_ns": time.time_ns(),
            "epoch": report.epoch,
            "epoch_id": report.epoch_id,
            "outcome": report.outcome,
            "report": report.SerializeToString(deterministic=True),
            "state": REPORT_QUEUED,
            "attempts": 0,
            "last_error": "",
        },
    )


def _record(row: Any) -> EpochRecord:
    blob = row["vector"]
    return EpochRecord(
        epoch_id=row["epoch_id"],
        history_id=row["history_id"],
        epoch=int(row["epoch"]),
        state=row["state"],
        outcome=None if row["outcome"] is None else OutcomeValue(int(row["outcome"])),
        block=int(row["block"]),
        extrinsic_hash=row["extrinsic_hash"],
        message=row["message"],
        vector=None if blob is None else weights_pb2.WeightVector.FromString(blob),
    )


def _stored_report(row: Any) -> StoredReport:
    return StoredReport(
        report_id=row["report_id"],
        report=weights_pb2.SubmissionReport.FromString(row["report"]),
        state=row["state"],
        attempts=int(row["attempts"]),
        last_error=row["last_error"],
    )
