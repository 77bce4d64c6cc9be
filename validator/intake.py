"""From the ``WatchWeights`` stream to the store: every vector verified, every verdict kept.

Each vector (a replayed or new one, or a snapshot's ``latest``) goes through
:func:`validator.verify.check_vector`. A vector that passes is queued for the submitter;
one that fails gets its final outcome (``REJECTED_INVALID`` or ``SKIPPED_STALE``) and a
report. Either way the stream's position moves in the same transaction, so a vector is
handled once, and one whose handling failed is received again after the reconnect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from platform_network.v1 import common_pb2, weights_pb2
from validator import telemetry
from validator.reports import ReportFactory
from validator.store import Cursor, Result, Store
from validator.streams import note_server
from validator.verify import REJECTED_INVALID, Expectations, Position, check_vector, is_newer

log = logging.getLogger(__name__)

Reason = common_pb2.SnapshotReason
Outcome = weights_pb2.SubmissionOutcome
Clock = Callable[[], int]
_NS = 1_000_000_000

QUEUED = "queued"
DUPLICATE = "duplicate"


def count_outcome(result: Result, reason: str | None = None) -> None:
    """Count a final outcome; ``reason`` also counts it as skipped (nothing submitted)."""
    telemetry.OUTCOMES.labels(
        Outcome.Name(result.outcome).removeprefix("SUBMISSION_OUTCOME_")
    ).inc()
    if reason is not None:
        telemetry.SKIPPED.labels(reason).inc()


class VectorIntake:
    """Verifies vectors and stores what becomes of each."""

    def __init__(
        self,
        store: Store,
        expect: Expectations,
        reports: ReportFactory,
        *,
        on_queued: Callable[[], None],
        on_report: Callable[[], None],
        on_latest: Callable[[], None],
        clock: Clock = time.time_ns,
    ) -> None:
        self._store = store
        self._expect = expect
        self._reports = reports
        self._on_queued = on_queued
        self._on_report = on_report
        self._on_latest = on_latest
        self._clock = clock
        # The newest vector for this subnet with a valid signature, fresh or not: what
        # the expiry watch looks at.
        self.latest: weights_pb2.WeightVector | None = None

    def note_latest(self, vector: weights_pb2.WeightVector) -> None:
        current = self.latest
        if current is None or is_newer(Position.of(vector), Position.of(current)):
            self.latest = vector
            telemetry.LATEST_EPOCH.set(vector.epoch)
            telemetry.LATEST_EXPIRY.set(vector.expire_time.ToNanoseconds() / _NS)
            self._on_latest()

    async def take(self, vector: weights_pb2.WeightVector, cursor: Cursor | None = None) -> str:
        """Verify ``vector`` and store the verdict (with ``cursor``, the stream position
        after it). Returns "queued", "duplicate" (the epoch is already known) or the name
        of the failed check."""
        now = self._clock()
        last = await self._store.last_claimed()
        refusal = check_vector(vector, self._expect, last, now)
        extra = {"epoch": vector.epoch, "epoch_id": vector.epoch_id[:64]}
        if refusal is None:
            self.note_latest(vector)
            if await self._store.accept(vector, cursor):
                telemetry.VECTORS.labels(QUEUED).inc()
                log.info(
                    "vector verified and queued for submission",
                    extra={**extra, "expire_time": vector.expire_time.ToJsonString()},
                )
                self._on_queued()
                return QUEUED
            telemetry.VECTORS.labels(DUPLICATE).inc()
            log.debug("vector already known", extra=extra)
            return DUPLICATE

        result = Result(refusal.outcome, refusal.message)
        report = self._reports.make(vector.epoch, vector.epoch_id, result, now)
        if not refusal.authentic:
            await self._store.record_inauthentic(report, cursor)
        else:
            if refusal.check in ("expired", "not_newer"):
                self.note_latest(vector)
            if not await self._store.record(vector, result, report, cursor):
                telemetry.VECTORS.labels(DUPLICATE).inc()
                log.debug("vector already known", extra=extra)
                return DUPLICATE
        telemetry.VECTORS.labels("refused").inc()
        telemetry.REFUSALS.labels(refusal.check).inc()
        invalid = refusal.outcome == REJECTED_INVALID
        count_outcome(result, "rejected" if invalid else refusal.check)
        log.log(
            logging.ERROR if invalid else logging.INFO,
            "vector refused" if invalid else "vector skipped",
            extra={
                **extra,
                "check": refusal.check,
                "outcome": Outcome.Name(refusal.outcome),
                "reason": refusal.message,
            },
        )
        self._on_report()
        return refusal.check


class WeightsFollower:
    """Applies ``WatchWeights`` messages: vectors to the intake, positions to the store."""

    def __init__(
        self,
        store: Store,
        intake: VectorIntake,
        *,
        clock_skew: float,
        clock: Clock = time.time_ns,
    ) -> None:
        self._store = store
        self._intake = intake
        self._clock_skew = clock_skew
        self._clock = clock
        self.cursor: Cursor | None = None
        self.server_epoch = ""
        self.snapshots: dict[str, int] = {}
        self._skewed = False

    async def load(self) -> None:
        self.cursor = await self._store.cursor("weights")

    def request(self) -> weights_pb2.WatchWeightsRequest:
        cursor = self.cursor
        if cursor is None:
            return weights_pb2.WatchWeightsRequest()
        return weights_pb2.WatchWeightsRequest(
            since_epoch=cursor.revision, history_id=cursor.history_id
        )

    async def apply(self, message: weights_pb2.WatchWeightsResponse) -> None:
        cursor = Cursor(message.cursor.history_id, message.cursor.revision)
        note_server(self, "weights", message.cursor.server_epoch)
        kind = message.WhichOneof("payload")
        if kind == "snapshot":
            snapshot = message.snapshot
            reason = Reason.Name(snapshot.reason)
            self.snapshots[reason] = self.snapshots.get(reason, 0) + 1
            telemetry.STREAM_SNAPSHOTS.labels("weights", reason).inc()
            log.log(
                logging.INFO
                if snapshot.reason == Reason.SNAPSHOT_REASON_INITIAL
                else logging.WARNING,
                "weights snapshot: the latest vector replaces the stream's position",
                extra={
                    "reason": reason,
                    "epoch": cursor.revision,
                    "previous_epoch": self.cursor.revision if self.cursor else 0,
                },
            )
            if snapshot.HasField("latest"):
                await self._intake.take(snapshot.latest, cursor)
            else:
                await self._store.save_cursor("weights", cursor)
        elif kind == "vector":
            await self._intake.take(message.vector, cursor)
        else:
            if cursor != self.cursor:
                await self._store.save_cursor("weights", cursor)
            self._check_clock(message.bookmark)
        self.cursor = cursor
        telemetry.STREAM_REVISION.labels("weights").set(cursor.revision)

    def _check_clock(self, bookmark: weights_pb2.WeightsBookmark) -> None:
        if not bookmark.HasField("server_time"):
            return
        offset = (bookmark.server_time.ToNanoseconds() - self._clock()) / _NS
        skewed = abs(offset) > self._clock_skew
        if skewed and not self._skewed:
            log.warning(
                "this host's clock and the master's disagree; expiry checks are unreliable "
                "(synchronize the clocks, e.g. with NTP)",
                extra={"offset_seconds": round(offset, 3), "tolerated": self._clock_skew},
            )
        self._skewed = skewed
