"""The ``platform_network.v1.Weights`` gRPC service."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from master.registry.feed import RegistryFeed
from master.weights.feed import FeedClosed, WeightsFeed
from master.weights.store import StoredSubmission, WeightsStore
from platform_common import metrics, ss58
from platform_common.refusals import (
    FieldViolation,
    already_exists,
    failed_precondition,
    invalid,
    invalid_field,
    not_found,
    permission_denied,
    resource_exhausted,
)
from platform_common.rpc import CALLER
from platform_network.v1 import common_pb2, weights_pb2, weights_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
Reason = common_pb2.SnapshotReason
Outcome = weights_pb2.SubmissionOutcome

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_REPORTS_PER_EPOCH = 32
_REPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EXTRINSIC = re.compile(r"0x[0-9a-f]{64}")
_INCLUDED = frozenset(
    {
        Outcome.SUBMISSION_OUTCOME_SUBMITTED,
        Outcome.SUBMISSION_OUTCOME_COMMITTED,
        Outcome.SUBMISSION_OUTCOME_REVEALED,
    }
)


class WeightsService(weights_pb2_grpc.WeightsServicer):
    def __init__(
        self,
        store: WeightsStore,
        feed: WeightsFeed,
        registry: RegistryFeed,
        *,
        bookmark_interval: float,
    ) -> None:
        self._store = store
        self._feed = feed
        self._registry = registry
        self._bookmark_interval = bookmark_interval

    # -- reads ------------------------------------------------------------------------

    async def GetLatestWeights(  # type: ignore[override]
        self, request: weights_pb2.GetLatestWeightsRequest, context: Context
    ) -> bytes:
        # The bytes serialized when the epoch was sealed (see add_to_server).
        latest = self._feed.latest_bytes
        if latest is None:
            raise not_found("no epoch has been sealed yet")
        return latest

    async def GetEpoch(
        self, request: weights_pb2.GetEpochRequest, context: Context
    ) -> weights_pb2.Epoch:
        which = request.WhichOneof("selector")
        if which is None:
            raise invalid_field("selector", "set exactly one of epoch or epoch_id")
        if which == "epoch":
            if request.epoch <= 0:
                raise invalid_field("epoch", f"must be >= 1; got {request.epoch}")
            epoch = await self._store.epoch(number=request.epoch)
            what = f"epoch {request.epoch}"
        else:
            if not request.epoch_id or len(request.epoch_id) > 64:
                raise invalid_field(
                    "epoch_id", f"must be 1..64 characters; got {request.epoch_id!r}"
                )
            epoch = await self._store.epoch(epoch_id=request.epoch_id)
            what = f"epoch_id {request.epoch_id!r}"
        if epoch is None:
            raise not_found(f"{what}: no such epoch in this history (never sealed, or pruned)")
        return epoch

    async def ListEpochs(
        self, request: weights_pb2.ListEpochsRequest, context: Context
    ) -> weights_pb2.ListEpochsResponse:
        size = _page_size(request.page_size)
        before = 0
        if request.page_token:
            token = _decode_token(request.page_token, "ListEpochs")
            value = token.get("before")
            if not isinstance(value, int) or value < 1:
                raise invalid_field("page_token", "is not a token returned by ListEpochs")
            before = value
        rows = await self._store.summaries(before, size + 1)
        page = rows[:size]
        next_token = _encode_token({"before": page[-1].epoch}) if len(rows) > size else ""
        return weights_pb2.ListEpochsResponse(epochs=page, next_page_token=next_token)

    # -- watch ------------------------------------------------------------------------

    async def WatchWeights(
        self, request: weights_pb2.WatchWeightsRequest, context: Context
    ) -> AsyncIterator[weights_pb2.WatchWeightsResponse]:
        if request.since_epoch < 0:
            raise invalid_field("since_epoch", f"must be 0 or positive; got {request.since_epoch}")
        feed = self._feed
        metrics.WATCH_STREAMS.labels("weights").inc()
        try:
            reason = self._resync_reason(request)
            if reason is not None:
                position = feed.epoch
                yield self._snapshot(reason)
            else:
                position = request.since_epoch
                replay = await self._after(position)
                if not replay:
                    yield self._bookmark(position)
                for vector in replay:
                    yield self._vector(vector)
                    position = vector.epoch
            last_sent = time.monotonic()
            while True:
                pending = await self._after(position)
                if pending:
                    for vector in pending:
                        yield self._vector(vector)
                        position = vector.epoch
                    last_sent = time.monotonic()
                    continue
                quiet_left = self._bookmark_interval - (time.monotonic() - last_sent)
                if quiet_left <= 0:
                    yield self._bookmark(position)
                    last_sent = time.monotonic()
                    continue
                await feed.wait_after(position, quiet_left)
        except FeedClosed:
            if context.done():
                return
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "server shutting down; reconnect with your last epoch"
            )
        finally:
            metrics.WATCH_STREAMS.labels("weights").dec()

    def _resync_reason(self, request: weights_pb2.WatchWeightsRequest) -> int | None:
        feed = self._feed
        since = request.since_epoch
        if since == 0:
            return Reason.SNAPSHOT_REASON_INITIAL
        if request.history_id != self._registry.history_id or since > feed.epoch:
            return Reason.SNAPSHOT_REASON_UNKNOWN_REVISION
        if feed.oldest_epoch and since < feed.oldest_epoch - 1:
            return Reason.SNAPSHOT_REASON_COMPACTED
        return None

    async def _after(self, epoch: int) -> list[weights_pb2.WeightVector]:
        buffered = self._feed.buffered_after(epoch)
        if buffered is not None:
            return buffered
        return await self._feed.stored_after(epoch)

    def _cursor(self, epoch: int) -> common_pb2.WatchCursor:
        return common_pb2.WatchCursor(
            server_epoch=self._registry.server_epoch,
            history_id=self._registry.history_id,
            revision=epoch,
        )

    def _snapshot(self, reason: int) -> weights_pb2.WatchWeightsResponse:
        metrics.WATCH_RESYNCS.labels("weights", Reason.Name(reason)).inc()  # type: ignore[arg-type]
        latest = self._feed.latest
        snapshot = weights_pb2.WeightsSnapshot(reason=common_pb2.SnapshotReason.ValueType(reason))
        if latest is not None:
            snapshot.latest.CopyFrom(latest)
        return weights_pb2.WatchWeightsResponse(
            cursor=self._cursor(latest.epoch if latest is not None else 0), snapshot=snapshot
        )

    def _vector(self, vector: weights_pb2.WeightVector) -> weights_pb2.WatchWeightsResponse:
        return weights_pb2.WatchWeightsResponse(cursor=self._cursor(vector.epoch), vector=vector)

    def _bookmark(self, epoch: int) -> weights_pb2.WatchWeightsResponse:
        now = Timestamp()
        now.GetCurrentTime()
        return weights_pb2.WatchWeightsResponse(
            cursor=self._cursor(epoch), bookmark=weights_pb2.WeightsBookmark(server_time=now)
        )

    # -- submissions --------------------------------------------------------------------

    async def ReportSubmission(
        self, request: weights_pb2.ReportSubmissionRequest, context: Context
    ) -> weights_pb2.ReportSubmissionResponse:
        if not request.HasField("report"):
            raise invalid_field("report", "is required")
        report = request.report
        problems = report_violations(report)
        if problems:
            raise invalid(problems)
        caller = CALLER.get()
        admin = caller.kind == "admin"
        if not admin and caller.subject != report.validator_hotkey:
            raise permission_denied(
                f"report.validator_hotkey: the call was signed by {caller.subject!r}, "
                f"not {report.validator_hotkey!r}"
            )
        epoch_id = await self._store.epoch_id(report.epoch)
        if epoch_id is None:
            raise not_found(
                f"report.epoch: no epoch {report.epoch} in this history (never sealed, or pruned)"
            )
        if epoch_id != report.epoch_id:
            raise failed_precondition(
                "EPOCH_ID_MISMATCH",
                "report.epoch_id",
                f"report.epoch_id: epoch {report.epoch} has id {epoch_id!r}; "
                f"got {report.epoch_id!r} (a report about another history of the master)",
            )
        existing = await self._store.submission(report.validator_hotkey, report.report_id)
        if existing is None:
            if (
                await self._store.count_reports(report.validator_hotkey, report.epoch)
                >= MAX_REPORTS_PER_EPOCH
            ):
                raise resource_exhausted(
                    f"report: at most {MAX_REPORTS_PER_EPOCH} reports per validator and epoch; "
                    f"epoch {report.epoch} has them all"
                )
            stored = StoredSubmission(report, datetime.now(UTC), admin)
            if await self._store.insert_submission(stored):
                return weights_pb2.ReportSubmissionResponse(submission=_submission(stored))
            # A concurrent retry stored it first: answer as for any retry.
            existing = await self._store.submission(report.validator_hotkey, report.report_id)
            assert existing is not None
        if existing.report.SerializeToString(deterministic=True) != report.SerializeToString(
            deterministic=True
        ):
            raise already_exists(
                f"report.report_id: {report.report_id!r} is already stored with different content"
            )
        return weights_pb2.ReportSubmissionResponse(
            submission=_submission(existing), duplicate=True
        )

    async def ListSubmissions(
        self, request: weights_pb2.ListSubmissionsRequest, context: Context
    ) -> weights_pb2.ListSubmissionsResponse:
        problems = []
        if request.epoch < 0:
            problems.append(FieldViolation("epoch", f"must be 0 or positive; got {request.epoch}"))
        if request.validator_hotkey:
            why = ss58.check(request.validator_hotkey)
            if why is not None:
                problems.append(
                    FieldViolation(
                        "validator_hotkey",
                        f"not a valid SS58 address ({why}); got {request.validator_hotkey!r}",
                    )
                )
        for index, outcome in enumerate(request.outcomes):
            if outcome not in Outcome.values() or outcome == Outcome.SUBMISSION_OUTCOME_UNSPECIFIED:
                problems.append(
                    FieldViolation(f"outcomes[{index}]", f"not a known outcome; got {outcome}")
                )
        if problems:
            raise invalid(problems)
        size = _page_size(request.page_size)
        after = None
        if request.page_token:
            token = _decode_token(request.page_token, "ListSubmissions")
            try:
                after = (
                    datetime.fromisoformat(token["t"]),
                    str(token["h"]),
                    str(token["r"]),
                )
                if token["f"] != _filters(request):
                    raise ValueError("filters changed")
            except (KeyError, TypeError, ValueError) as exc:
                raise invalid_field(
                    "page_token",
                    "is not a token returned by ListSubmissions with the same filters",
                ) from exc
        rows = await self._store.submissions(
            epoch=request.epoch,
            validator_hotkey=request.validator_hotkey,
            outcomes=list(request.outcomes),
            after=after,
            limit=size + 1,
        )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = _encode_token(
                {
                    "t": last.receive_time.isoformat(),
                    "h": last.report.validator_hotkey,
                    "r": last.report.report_id,
                    "f": _filters(request),
                }
            )
        return weights_pb2.ListSubmissionsResponse(
            submissions=[_submission(s) for s in page], next_page_token=next_token
        )


def report_violations(report: weights_pb2.SubmissionReport) -> list[FieldViolation]:
    """Every rule of SubmissionReport (weights.proto) the report breaks."""
    out: list[FieldViolation] = []

    def bad(name: str, rule: str) -> None:
        out.append(FieldViolation(f"report.{name}", rule))

    if not _REPORT_ID.fullmatch(report.report_id):
        bad("report_id", f"must be 1..64 characters of [A-Za-z0-9_-]; got {report.report_id!r}")
    if report.epoch < 1:
        bad("epoch", f"must be >= 1; got {report.epoch}")
    if not 1 <= len(report.epoch_id) <= 64:
        bad("epoch_id", f"must be 1..64 characters; got {report.epoch_id!r}")
    why = ss58.check(report.validator_hotkey)
    if why is not None:
        bad(
            "validator_hotkey",
            f"not a valid SS58 address ({why}); got {report.validator_hotkey!r}",
        )
    if (
        report.outcome not in Outcome.values()
        or report.outcome == Outcome.SUBMISSION_OUTCOME_UNSPECIFIED
    ):
        bad("outcome", f"must be a known outcome other than UNSPECIFIED; got {report.outcome}")
    included = report.outcome in _INCLUDED
    if report.block < 0 or (included and report.block == 0):
        rule = "must be > 0 for SUBMITTED, COMMITTED and REVEALED" if included else "must be >= 0"
        bad("block", f"{rule}; got {report.block}")
    if (report.extrinsic_hash or included) and not _EXTRINSIC.fullmatch(report.extrinsic_hash):
        bad(
            "extrinsic_hash",
            "must be 0x followed by 64 lowercase hex digits"
            + (" (required for SUBMITTED, COMMITTED and REVEALED)" if included else "")
            + f"; got {report.extrinsic_hash!r}",
        )
    if len(report.message) > 2048:
        bad("message", f"at most 2048 characters; got {len(report.message)}")
    if not report.HasField("occur_time"):
        bad("occur_time", "is required")
    if len(report.agent_version) > 64:
        bad("agent_version", f"at most 64 characters; got {len(report.agent_version)}")
    return out


def _submission(stored: StoredSubmission) -> weights_pb2.Submission:
    out = weights_pb2.Submission(report=stored.report, admin_reported=stored.admin_reported)
    out.receive_time.FromDatetime(stored.receive_time)
    return out


def _filters(request: weights_pb2.ListSubmissionsRequest) -> list[Any]:
    return [request.epoch, request.validator_hotkey, sorted(request.outcomes)]


def _page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise invalid_field("page_size", f"must be 0..{MAX_PAGE_SIZE}; got {value}")
    return value


def _encode_token(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, rpc: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise invalid_field("page_token", f"is not a token returned by {rpc}") from exc
    if not isinstance(data, dict):
        raise invalid_field("page_token", f"is not a token returned by {rpc}")
    return data


def add_to_server(service: WeightsService, server: grpc.aio.Server) -> None:
    """Register the service; GetLatestWeights sends pre-serialized bytes as they are."""
    capture = _Capture()
    weights_pb2_grpc.add_WeightsServicer_to_server(service, capture)  # type: ignore[arg-type]
    handlers = dict(capture.handlers)
    latest = handlers["GetLatestWeights"]
    handlers["GetLatestWeights"] = grpc.unary_unary_rpc_method_handler(
        service.GetLatestWeights,
        request_deserializer=latest.request_deserializer,
        response_serializer=_bytes_or_message,
    )
    name = "platform_network.v1.Weights"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _bytes_or_message(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    serialized: bytes = value.SerializeToString()
    return serialized


class _Capture:
    """Stands in for a server to read the generated handlers."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers
