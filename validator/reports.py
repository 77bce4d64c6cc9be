"""Submission reports: built once, stored with their outcome, delivered until acknowledged.

The master stores a report by ``report_id`` and answers a re-sent one with
``duplicate = true`` only if its bytes are the same, so a report is built exactly once
(id, occur time, message) and the stored bytes are what every attempt sends. The
:class:`Reporter` drains the store's outbox in order; a refusal that no retry can change
(the master does not know the epoch, the report breaks a rule) drops the report with a
log line, anything else (master down, restarting, not accepting signed calls yet) is
retried with jittered backoff for as long as it takes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from platform_network.v1 import weights_pb2
from validator import telemetry
from validator.store import (
    REPORT_DROPPED,
    REPORT_QUEUED,
    REPORT_SENT,
    Result,
    Store,
    StoredReport,
)
from validator.streams import Backoff

log = logging.getLogger(__name__)

Outcome = weights_pb2.SubmissionOutcome
MAX_MESSAGE = 2048
MAX_AGENT_VERSION = 64
# Refusals no retry can change: the report is dropped (and logged).
PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
BATCH = 32


def agent_version() -> str:
    try:
        return metadata.version("platform-network")[:MAX_AGENT_VERSION]
    except metadata.PackageNotFoundError:
        return ""


class ReportFactory:
    """Makes the report of one outcome, signed off by this validator's hotkey."""

    def __init__(self, hotkey: str, version: str | None = None) -> None:
        self.hotkey = hotkey
        self.version = agent_version() if version is None else version[:MAX_AGENT_VERSION]

    def make(
        self, epoch: int, epoch_id: str, result: Result, now_ns: int
    ) -> weights_pb2.SubmissionReport:
        occurred = Timestamp()
        occurred.FromNanoseconds(now_ns)
        return weights_pb2.SubmissionReport(
            report_id=uuid.uuid4().hex,
            epoch=epoch,
            epoch_id=epoch_id[:64],
            validator_hotkey=self.hotkey,
            outcome=result.outcome,
            block=max(result.block, 0),
            extrinsic_hash=result.extrinsic_hash,
            message=result.message[:MAX_MESSAGE],
            occur_time=occurred,
            agent_version=self.version,
        )


Send = Callable[[weights_pb2.SubmissionReport], Awaitable[weights_pb2.ReportSubmissionResponse]]


class Reporter:
    """Delivers the store's queued reports to the master, oldest first."""

    def __init__(self, store: Store, send: Send, backoff: Backoff) -> None:
        self._store = store
        self._send = send
        self._backoff = backoff
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A report was queued."""
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            batch = await self._store.unsent_reports(BATCH)
            telemetry.REPORTS_QUEUED.set(await self._store.count_unsent_reports())
            if not batch:
                await self._wake.wait()
                continue
            if await self.deliver(batch):
                failures = 0
                continue
            delay = self._backoff.delay(failures)
            failures += 1
            await asyncio.sleep(delay)

    async def deliver(self, batch: list[StoredReport] | None = None) -> bool:
        """Send queued reports in order; False when one must be retried later."""
        reports = batch if batch is not None else await self._store.unsent_reports(BATCH)
        for stored in reports:
            report = stored.report
            extra = {
                "report_id": report.report_id,
                "epoch": report.epoch,
                "outcome": Outcome.Name(report.outcome),
            }
            try:
                response = await self._send(report)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                detail = f"{code.name}: {exc.details()}"
                if code in PERMANENT:
                    await self._store.mark_report(report.report_id, REPORT_DROPPED, detail)
                    telemetry.REPORTS.labels("dropped").inc()
                    log.warning(
                        "the master refused a submission report; it is not sent again",
                        extra={**extra, "code": code.name, "error": exc.details()},
                    )
                    continue
                await self._store.mark_report(report.report_id, REPORT_QUEUED, detail)
                telemetry.REPORTS.labels("retry").inc()
                log.info(
                    "submission report not delivered; retrying later",
                    extra={**extra, "code": code.name, "error": exc.details()},
                )
                return False
            await self._store.mark_report(report.report_id, REPORT_SENT)
            telemetry.REPORTS.labels("duplicate" if response.duplicate else "sent").inc()
            log.debug("submission report delivered", extra=extra)
        return True
