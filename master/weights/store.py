"""Persistence of sealed epochs and of validators' submission reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from master.db.engine import insert_once
from master.db.models import EpochRow, EpochTempoRow, SubmissionRow
from platform_network.v1 import weights_pb2


class EpochTaken(Exception):
    """Another writer (a second master replica) sealed this epoch number first."""


@dataclass(frozen=True)
class StoredSubmission:
    report: weights_pb2.SubmissionReport
    receive_time: datetime
    admin_reported: bool


class WeightsStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- epochs -------------------------------------------------------------------

    async def last_epoch(self) -> int:
        """Highest epoch number ever sealed in this database (0 for none)."""
        async with self._engine.connect() as conn:
            value = (await conn.execute(select(func.max(EpochRow.epoch)))).scalar_one()
        return int(value or 0)

    async def oldest_epoch(self) -> int:
        """Lowest retained epoch number (0 for none)."""
        async with self._engine.connect() as conn:
            value = (await conn.execute(select(func.min(EpochRow.epoch)))).scalar_one()
        return int(value or 0)

    async def insert_epoch(self, epoch: weights_pb2.Epoch) -> None:
        """Persist a sealed epoch; raises EpochTaken if its number is already used."""
        vector = epoch.vector
        counts = {status: 0 for status in weights_pb2.ChallengeEpochStatus.values()}
        for result in epoch.challenges:
            counts[result.status] += 1
        row = {
            "epoch": vector.epoch,
            "epoch_id": vector.epoch_id,
            "create_time": vector.create_time.ToDatetime(UTC),
            "expire_time": vector.expire_time.ToDatetime(UTC),
            "registry_revision": epoch.registry_revision,
            "metagraph_block": vector.metagraph_block,
            "policy": vector.policy,
            "challenges_ok": counts[weights_pb2.CHALLENGE_EPOCH_STATUS_OK],
            "challenges_failed": counts[weights_pb2.CHALLENGE_EPOCH_STATUS_FAILED],
            "challenges_empty": counts[weights_pb2.CHALLENGE_EPOCH_STATUS_EMPTY],
            "burn_weight": epoch.burn_weight,
            "weight_count": len(vector.weights),
            "vector": vector.SerializeToString(deterministic=True),
            "body": epoch.SerializeToString(deterministic=True),
        }
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(EpochRow).values(**row))
        except IntegrityError as exc:
            raise EpochTaken(f"epoch {vector.epoch} is already sealed") from exc

    async def epoch(self, *, number: int = 0, epoch_id: str = "") -> weights_pb2.Epoch | None:
        query = select(EpochRow.body)
        query = query.where(EpochRow.epoch == number if number else EpochRow.epoch_id == epoch_id)
        async with self._engine.connect() as conn:
            body = (await conn.execute(query)).scalar_one_or_none()
        return None if body is None else weights_pb2.Epoch.FromString(body)

    async def epoch_id(self, number: int) -> str | None:
        """The id of epoch ``number``, without reading its record."""
        async with self._engine.connect() as conn:
            value = (
                await conn.execute(select(EpochRow.epoch_id).where(EpochRow.epoch == number))
            ).scalar_one_or_none()
        return None if value is None else str(value)

    async def vectors_after(self, epoch: int, limit: int) -> list[bytes]:
        """Serialized vectors with an epoch > ``epoch``, oldest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(EpochRow.vector)
                .where(EpochRow.epoch > epoch)
                .order_by(EpochRow.epoch)
                .limit(limit)
            )
            return [bytes(v) for v in rows.scalars()]

    async def recent_vectors(self, limit: int) -> list[bytes]:
        """The newest ``limit`` serialized vectors, oldest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(EpochRow.vector).order_by(EpochRow.epoch.desc()).limit(limit)
            )
            return [bytes(v) for v in rows.scalars()][::-1]

    async def summaries(self, before: int, limit: int) -> list[weights_pb2.EpochSummary]:
        """Summaries of epochs numbered below ``before`` (0: no bound), newest first."""
        query = select(EpochRow).order_by(EpochRow.epoch.desc()).limit(limit)
        if before:
            query = query.where(EpochRow.epoch < before)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        out = []
        for row in rows:
            summary = weights_pb2.EpochSummary(
                epoch=row.epoch,
                epoch_id=row.epoch_id,
                metagraph_block=row.metagraph_block,
                policy=row.policy,
                challenges_ok=row.challenges_ok,
                challenges_failed=row.challenges_failed,
                challenges_empty=row.challenges_empty,
                burn_weight=row.burn_weight,
                weight_count=row.weight_count,
            )
            summary.create_time.FromDatetime(_utc(row.create_time))
            summary.expire_time.FromDatetime(_utc(row.expire_time))
            out.append(summary)
        return out

    async def prune(self, keep: int) -> int:
        """Delete all but the newest ``keep`` epochs, and all but the newest ``keep``
        tempo claims; return the number of epochs deleted."""
        async with self._engine.begin() as conn:
            last_tempo = (
                await conn.execute(
                    select(EpochTempoRow.tempo_end_block)
                    .order_by(EpochTempoRow.tempo_end_block.desc())
                    .offset(keep)
                    .limit(1)
                )
            ).scalar_one_or_none()
            if last_tempo is not None:
                await conn.execute(
                    delete(EpochTempoRow).where(EpochTempoRow.tempo_end_block <= last_tempo)
                )
            cutoff = (
                await conn.execute(
                    select(EpochRow.epoch).order_by(EpochRow.epoch.desc()).offset(keep).limit(1)
                )
            ).scalar_one_or_none()
            if cutoff is None:
                return 0
            result = await conn.execute(delete(EpochRow).where(EpochRow.epoch <= cutoff))
            return int(result.rowcount or 0)

    # -- tempo claims (replicas on the tempo schedule) --------------------------------

    async def claim_tempo(self, end_block: int, holder: str) -> bool:
        """Take the tempo whose chain epoch runs at ``end_block`` for ``holder``; False
        when another holder has it (the primary key decides, whichever replica asks)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                insert_once(self._engine, EpochTempoRow).values(
                    tempo_end_block=end_block, holder=holder, claim_time=datetime.now(UTC)
                )
            )
        return int(result.rowcount or 0) == 1

    async def release_tempo(self, end_block: int, holder: str) -> None:
        """Give the tempo back (its epoch could not be sealed), if ``holder`` has it."""
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(EpochTempoRow).where(
                    EpochTempoRow.tempo_end_block == end_block, EpochTempoRow.holder == holder
                )
            )

    async def tempo_holder(self, end_block: int) -> str | None:
        """Who has the tempo whose chain epoch runs at ``end_block``, if anyone."""
        async with self._engine.connect() as conn:
            holder = (
                await conn.execute(
                    select(EpochTempoRow.holder).where(EpochTempoRow.tempo_end_block == end_block)
                )
            ).scalar_one_or_none()
        return None if holder is None else str(holder)

    # -- submissions ------------------------------------------------------------------

    async def submission(self, validator_hotkey: str, report_id: str) -> StoredSubmission | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(SubmissionRow).where(
                        SubmissionRow.validator_hotkey == validator_hotkey,
                        SubmissionRow.report_id == report_id,
                    )
                )
            ).one_or_none()
        return None if row is None else _submission(row)

    async def count_reports(self, validator_hotkey: str, epoch: int) -> int:
        async with self._engine.connect() as conn:
            value = (
                await conn.execute(
                    select(func.count()).where(
                        SubmissionRow.validator_hotkey == validator_hotkey,
                        SubmissionRow.epoch == epoch,
                    )
                )
            ).scalar_one()
        return int(value)

    async def insert_submission(self, stored: StoredSubmission) -> bool:
        """Store a report; False if (validator, report_id) was stored meanwhile."""
        report = stored.report
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    insert(SubmissionRow).values(
                        validator_hotkey=report.validator_hotkey,
                        report_id=report.report_id,
                        epoch=report.epoch,
                        outcome=report.outcome,
                        receive_time=stored.receive_time,
                        admin_reported=stored.admin_reported,
                        report=report.SerializeToString(deterministic=True),
                    )
                )
        except IntegrityError:
            return False
        return True

    async def submissions(
        self,
        *,
        epoch: int,
        validator_hotkey: str,
        outcomes: Sequence[int],
        after: tuple[datetime, str, str] | None,
        limit: int,
    ) -> list[StoredSubmission]:
        """Reports newest first by (receive_time, validator, report_id), after a page key."""
        query = select(SubmissionRow)
        if epoch:
            query = query.where(SubmissionRow.epoch == epoch)
        if validator_hotkey:
            query = query.where(SubmissionRow.validator_hotkey == validator_hotkey)
        if outcomes:
            query = query.where(SubmissionRow.outcome.in_(list(outcomes)))
        if after is not None:
            time, hotkey, report_id = after
            query = query.where(
                (SubmissionRow.receive_time < time)
                | (
                    (SubmissionRow.receive_time == time)
                    & (
                        (SubmissionRow.validator_hotkey < hotkey)
                        | (
                            (SubmissionRow.validator_hotkey == hotkey)
                            & (SubmissionRow.report_id < report_id)
                        )
                    )
                )
            )
        query = query.order_by(
            SubmissionRow.receive_time.desc(),
            SubmissionRow.validator_hotkey.desc(),
            SubmissionRow.report_id.desc(),
        ).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_submission(row) for row in rows]


def _submission(row: Any) -> StoredSubmission:
    # A result row of select(SubmissionRow) on a Core connection: columns by name.
    return StoredSubmission(
        report=weights_pb2.SubmissionReport.FromString(row.report),
        receive_time=_utc(row.receive_time),
        admin_reported=row.admin_reported,
    )


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
