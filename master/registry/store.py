"""The registry's persistent store: challenges, the event log and its head.

Every write runs in one transaction that first bumps ``registry_state.revision``.
That row lock serializes writers (across master replicas on PostgreSQL), so:

* revisions are gap-free and committed in order, which is what lets a watcher
  resume from "the last revision I applied" without missing anything;
* the emission-sum invariant is checked against committed state that cannot
  change until this transaction ends.

A refused write raises :class:`~platform_common.refusals.Refusal` inside the
transaction, which rolls it back: nothing stored changes and the revision does
not advance.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from master.db.models import ChallengeRow, RegistryEventRow, RegistryState
from master.registry import rules
from master.registry.rules import Challenge, Policy, Spec, Status
from master.registry.tokens import TokenIssuer
from platform_common import tokens
from platform_common.refusals import already_exists, failed_precondition, not_found

EVENT_PUT = 1
EVENT_DELETE = 2


@dataclass(frozen=True)
class Head:
    revision: int
    compacted_revision: int
    history_id: str


@dataclass(frozen=True)
class StoredEvent:
    revision: int
    type: int
    challenge: Challenge
    commit_time: datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


class RegistryStore:
    def __init__(
        self,
        engine: AsyncEngine,
        policy: Policy,
        issuer: TokenIssuer,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._issuer = issuer
        self._clock = clock
        # Writers in this process queue here rather than on the database lock.
        self._write_lock = asyncio.Lock()

    @property
    def policy(self) -> Policy:
        return self._policy

    # -- writes ---------------------------------------------------------------

    async def create(self, spec: Spec) -> tuple[Challenge, str]:
        """Register ``spec`` as a DRAFT challenge; return it and its clear token."""
        spec = rules.check_spec(spec, self._policy)
        token, nonce = self._issuer.issue(spec.slug)
        async with self._write() as (conn, revision, now):
            if await self._load(conn, spec.slug) is not None:
                raise already_exists(f"challenge.slug: a challenge {spec.slug!r} already exists")
            challenge = Challenge(
                spec=spec,
                status=Status.DRAFT,
                create_time=now,
                update_time=now,
                revision=revision,
                create_revision=revision,
                token_issue_time=now,
                status_time=now,
            )
            await conn.execute(
                insert(ChallengeRow).values(
                    **_row_values(challenge),
                    token_sha256=tokens.digest(token),
                    token_nonce=nonce,
                )
            )
            await self._log(conn, EVENT_PUT, challenge, now)
        return challenge, token

    async def update(
        self, slug: str, patch: Spec, paths: Sequence[str], expected_revision: int = 0
    ) -> Challenge:
        paths = rules.check_mask(paths)
        async with self._write() as (conn, revision, now):
            current = await self._require(conn, slug)
            rules.check_expected_revision(current, expected_revision)
            spec = rules.check_spec(rules.apply_mask(current.spec, patch, paths), self._policy)
            if current.status is Status.ACTIVE and spec.share_ppb != current.spec.share_ppb:
                rules.check_emission(slug, await self._active_shares(conn, slug), spec.share_ppb)
            changed = dataclasses.replace(current, spec=spec, update_time=now, revision=revision)
            await self._save(conn, changed)
            await self._log(conn, EVENT_PUT, changed, now)
        return changed

    async def set_status(
        self, slug: str, status: Status, expected_revision: int = 0, reason: str = ""
    ) -> tuple[Challenge, bool]:
        """Move ``slug`` to ``status``; return it and whether anything changed.

        Setting the current status again changes nothing (no new revision), so
        clients can retry safely.
        """
        rules.check_status_reason(reason)
        try:
            async with self._write() as (conn, revision, now):
                current = await self._require(conn, slug)
                rules.check_expected_revision(current, expected_revision)
                if current.status is status:
                    # Roll back: the revision bump must not be committed without an event.
                    raise _Unchanged(current)
                rules.check_transition(slug, current.status, status)
                if status is Status.ACTIVE:
                    rules.check_emission(
                        slug, await self._active_shares(conn, slug), current.spec.share_ppb
                    )
                changed = dataclasses.replace(
                    current,
                    status=status,
                    status_time=now,
                    status_reason=reason,
                    update_time=now,
                    revision=revision,
                )
                await self._save(conn, changed)
                await self._log(conn, EVENT_PUT, changed, now)
        except _Unchanged as unchanged:
            return unchanged.challenge, False
        return changed, True

    async def delete(self, slug: str, expected_revision: int = 0) -> int:
        async with self._write() as (conn, revision, now):
            current = await self._require(conn, slug)
            rules.check_expected_revision(current, expected_revision)
            if current.status is Status.ACTIVE:
                raise failed_precondition(
                    "STATUS",
                    f"challenges/{slug}",
                    f"status: {slug!r} is ACTIVE; set it INACTIVE or DISABLED before deleting it",
                )
            await conn.execute(delete(ChallengeRow).where(ChallengeRow.slug == slug))
            await self._log(conn, EVENT_DELETE, current, now, revision=revision)
        return revision

    async def rotate_token(self, slug: str, expected_revision: int = 0) -> tuple[Challenge, str]:
        token, nonce = self._issuer.issue(slug)
        async with self._write() as (conn, revision, now):
            current = await self._require(conn, slug)
            rules.check_expected_revision(current, expected_revision)
            changed = dataclasses.replace(
                current, token_issue_time=now, update_time=now, revision=revision
            )
            await self._save(conn, changed, token_sha256=tokens.digest(token), token_nonce=nonce)
            await self._log(conn, EVENT_PUT, changed, now)
        return changed, token

    async def compact(self, keep: int) -> int:
        """Delete all but the newest ``keep`` events; return the new compacted revision."""
        async with self._write_lock, self._engine.begin() as conn:
            state = (
                await conn.execute(
                    select(RegistryState.revision, RegistryState.compacted_revision)
                    .where(RegistryState.id == 1)
                    .with_for_update()
                )
            ).one()
            target = max(state.compacted_revision, state.revision - keep)
            if target > state.compacted_revision:
                await conn.execute(
                    delete(RegistryEventRow).where(RegistryEventRow.revision <= target)
                )
                await conn.execute(
                    update(RegistryState)
                    .where(RegistryState.id == 1)
                    .values(compacted_revision=target)
                )
            return int(target)

    # -- reads ----------------------------------------------------------------

    async def get(self, slug: str) -> Challenge:
        async with self._engine.connect() as conn:
            return await self._require(conn, slug)

    async def list_challenges(
        self, *, limit: int, after_slug: str = "", statuses: Sequence[Status] = ()
    ) -> tuple[list[Challenge], int]:
        """Challenges in slug order after ``after_slug``, and the revision read at."""
        query = select(ChallengeRow).where(ChallengeRow.slug > after_slug)
        if statuses:
            query = query.where(ChallengeRow.status.in_([int(s) for s in statuses]))
        query = query.order_by(ChallengeRow.slug).limit(limit)
        async with _snapshot_read(self._engine) as conn:
            rows = (await conn.execute(query)).all()
            head = await _read_head(conn)
        return [_from_row(row) for row in rows], head.revision

    async def snapshot(self) -> tuple[Head, list[Challenge]]:
        """Every challenge and the head, read consistently."""
        async with _snapshot_read(self._engine) as conn:
            head = await _read_head(conn)
            rows = (await conn.execute(select(ChallengeRow).order_by(ChallengeRow.slug))).all()
        return head, [_from_row(row) for row in rows]

    async def events_after(
        self, revision: int, limit: int = 1000
    ) -> tuple[Head, list[StoredEvent]]:
        """Events with revisions after ``revision``, oldest first, and the head read with them."""
        async with _snapshot_read(self._engine) as conn:
            head = await _read_head(conn)
            rows = (
                await conn.execute(
                    select(RegistryEventRow)
                    .where(RegistryEventRow.revision > revision)
                    .order_by(RegistryEventRow.revision)
                    .limit(limit)
                )
            ).all()
        return head, [
            StoredEvent(
                revision=row.revision,
                type=row.type,
                challenge=rules.challenge_from_dict(row.challenge),
                commit_time=_utc(row.commit_time),
            )
            for row in rows
        ]

    async def token_matches(self, slug: str, token: str) -> bool:
        async with self._engine.connect() as conn:
            digest = (
                await conn.execute(
                    select(ChallengeRow.token_sha256).where(ChallengeRow.slug == slug)
                )
            ).scalar_one_or_none()
        return digest is not None and tokens.matches(token, digest)

    async def tokens_of(self, slugs: Sequence[str]) -> dict[str, str]:
        """The clear tokens of ``slugs`` (re-derived; challenges whose token was
        issued without a nonce, or that no longer exist, are left out)."""
        if not slugs:
            return {}
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(ChallengeRow.slug, ChallengeRow.token_nonce).where(
                        ChallengeRow.slug.in_(list(slugs))
                    )
                )
            ).all()
        return {slug: self._issuer.token(slug, nonce) for slug, nonce in rows if nonce}

    # -- helpers --------------------------------------------------------------

    def _write(self) -> _WriteTxn:
        return _WriteTxn(self)

    async def _require(self, conn: AsyncConnection, slug: str) -> Challenge:
        rules.check_slug(slug)
        challenge = await self._load(conn, slug)
        if challenge is None:
            raise not_found(f"slug: no challenge {slug!r}")
        return challenge

    @staticmethod
    async def _load(conn: AsyncConnection, slug: str) -> Challenge | None:
        row = (await conn.execute(select(ChallengeRow).where(ChallengeRow.slug == slug))).first()
        return None if row is None else _from_row(row)

    @staticmethod
    async def _active_shares(conn: AsyncConnection, excluding: str) -> list[int]:
        rows = await conn.execute(
            select(ChallengeRow.emission_share_ppb).where(
                ChallengeRow.status == int(Status.ACTIVE), ChallengeRow.slug != excluding
            )
        )
        return [int(v) for v in rows.scalars()]

    @staticmethod
    async def _save(conn: AsyncConnection, challenge: Challenge, **extra: Any) -> None:
        await conn.execute(
            update(ChallengeRow)
            .where(ChallengeRow.slug == challenge.slug)
            .values(**_row_values(challenge), **extra)
        )

    @staticmethod
    async def _log(
        conn: AsyncConnection,
        kind: int,
        challenge: Challenge,
        now: datetime,
        revision: int | None = None,
    ) -> None:
        await conn.execute(
            insert(RegistryEventRow).values(
                revision=challenge.revision if revision is None else revision,
                slug=challenge.slug,
                type=kind,
                challenge=rules.challenge_to_dict(challenge),
                commit_time=now,
            )
        )


class _Unchanged(Exception):
    """Raised inside a write transaction to roll it back when there is nothing to do."""

    def __init__(self, challenge: Challenge) -> None:
        self.challenge = challenge


class _WriteTxn:
    """``async with store._write() as (conn, revision, now)``: one serialized write."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def __aenter__(self) -> tuple[AsyncConnection, int, datetime]:
        await self._store._write_lock.acquire()
        try:
            self._ctx = self._store._engine.begin()
            conn = await self._ctx.__aenter__()
            revision = (
                await conn.execute(
                    update(RegistryState)
                    .where(RegistryState.id == 1)
                    .values(revision=RegistryState.revision + 1)
                    .returning(RegistryState.revision)
                )
            ).scalar_one()
        except BaseException:
            if hasattr(self, "_ctx"):
                await self._ctx.__aexit__(None, None, None)
            self._store._write_lock.release()
            raise
        return conn, int(revision), self._store._clock()

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._ctx.__aexit__(*exc)
        finally:
            self._store._write_lock.release()


def _snapshot_read(engine: AsyncEngine) -> Any:
    """A read-only transaction whose statements all see one snapshot."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ").begin()
    return engine.begin()


async def _read_head(conn: AsyncConnection) -> Head:
    row = (
        await conn.execute(
            select(
                RegistryState.revision, RegistryState.compacted_revision, RegistryState.history_id
            ).where(RegistryState.id == 1)
        )
    ).one()
    return Head(int(row.revision), int(row.compacted_revision), row.history_id)


def _row_values(challenge: Challenge) -> dict[str, Any]:
    return {
        "slug": challenge.slug,
        "status": int(challenge.status),
        "emission_share_ppb": challenge.spec.share_ppb,
        "spec": rules.spec_to_dict(challenge.spec),
        "token_issue_time": challenge.token_issue_time,
        "status_time": challenge.status_time,
        "status_reason": challenge.status_reason,
        "create_time": challenge.create_time,
        "update_time": challenge.update_time,
        "revision": challenge.revision,
        "create_revision": challenge.create_revision,
    }


def _from_row(row: Any) -> Challenge:
    return Challenge(
        spec=rules.spec_from_dict(row.spec),
        status=Status(row.status),
        create_time=_utc(row.create_time),
        update_time=_utc(row.update_time),
        revision=int(row.revision),
        create_revision=int(row.create_revision),
        token_issue_time=_utc(row.token_issue_time),
        status_time=_utc(row.status_time),
        status_reason=row.status_reason,
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
