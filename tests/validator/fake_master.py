"""A scripted stand-in for the master's Weights and Registry services, on real gRPC.

For the agent's transport behaviour that a real master cannot be made to show on
demand: a stream that breaks after a given message, a report refused with a given
status. Every call's signature is checked with ``platform_common.callauth`` (and the
body hash against the request received), as the master does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from platform_common import callauth
from platform_network.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    weights_pb2,
    weights_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class Script:
    """What the fake master does. Each WatchWeights call takes the next list from
    ``weights_streams``: it sends those messages, then ends with ``end_code`` (when the
    lists run out, the stream stays open). Each ReportSubmission call takes the next
    code from ``report_codes`` (OK once they run out). With ``hold`` set, each stream
    ends only once the event is set."""

    weights_streams: list[list[weights_pb2.WatchWeightsResponse]] = field(default_factory=list)
    end_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    report_codes: list[grpc.StatusCode] = field(default_factory=list)
    hold: asyncio.Event | None = None
    weights_requests: list[weights_pb2.WatchWeightsRequest] = field(default_factory=list)
    registry_requests: list[registry_pb2.WatchRegistryRequest] = field(default_factory=list)
    reports: list[bytes] = field(default_factory=list)
    signers: list[str] = field(default_factory=list)


async def _check_signed(context: Context, method: str, request: Any) -> str:
    try:
        call = callauth.verify_call(context.invocation_metadata() or (), method)
    except callauth.CallAuthError as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    if call.body_sha256 != callauth.body_digest(request):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "body hash mismatch")
    return call.hotkey


class _Weights(weights_pb2_grpc.WeightsServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def WatchWeights(
        self, request: weights_pb2.WatchWeightsRequest, context: Context
    ) -> AsyncIterator[weights_pb2.WatchWeightsResponse]:
        signer = await _check_signed(context, "/platform_network.v1.Weights/WatchWeights", request)
        self.script.signers.append(signer)
        self.script.weights_requests.append(request)
        if not self.script.weights_streams:
            await asyncio.Event().wait()
        for message in self.script.weights_streams.pop(0):
            yield message
        if self.script.hold is not None:
            await self.script.hold.wait()
        await context.abort(self.script.end_code, "scripted end of stream")

    async def ReportSubmission(
        self, request: weights_pb2.ReportSubmissionRequest, context: Context
    ) -> weights_pb2.ReportSubmissionResponse:
        await _check_signed(context, "/platform_network.v1.Weights/ReportSubmission", request)
        self.script.reports.append(request.report.SerializeToString(deterministic=True))
        if self.script.report_codes:
            code = self.script.report_codes.pop(0)
            if code != grpc.StatusCode.OK:
                await context.abort(code, f"scripted {code.name}")
        return weights_pb2.ReportSubmissionResponse(
            submission=weights_pb2.Submission(report=request.report)
        )


class _Registry(registry_pb2_grpc.RegistryServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def WatchRegistry(
        self, request: registry_pb2.WatchRegistryRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchRegistryResponse]:
        await _check_signed(context, "/platform_network.v1.Registry/WatchRegistry", request)
        self.script.registry_requests.append(request)
        yield registry_pb2.WatchRegistryResponse(
            cursor=common_pb2.WatchCursor(server_epoch="s", history_id="history-a", revision=0),
            snapshot=registry_pb2.RegistrySnapshot(
                reason=common_pb2.SNAPSHOT_REASON_INITIAL, challenges=[]
            ),
        )
        await asyncio.Event().wait()


class FakeMaster:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.server = grpc.aio.server()
        weights_pb2_grpc.add_WeightsServicer_to_server(
            _Weights(script),  # type: ignore[abstract]
            self.server,
        )
        registry_pb2_grpc.add_RegistryServicer_to_server(
            _Registry(script),  # type: ignore[abstract]
            self.server,
        )
        self.address = ""

    async def start(self) -> str:
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        await self.server.stop(0)


def vector_message(
    vector: weights_pb2.WeightVector, server_epoch: str = "s"
) -> weights_pb2.WatchWeightsResponse:
    return weights_pb2.WatchWeightsResponse(
        cursor=common_pb2.WatchCursor(
            server_epoch=server_epoch, history_id=vector.history_id, revision=vector.epoch
        ),
        vector=vector,
    )


def snapshot_message(
    vector: weights_pb2.WeightVector | None,
    reason: common_pb2.SnapshotReason.ValueType,
    history_id: str = "history-a",
    server_epoch: str = "s",
) -> weights_pb2.WatchWeightsResponse:
    snapshot = weights_pb2.WeightsSnapshot(reason=reason)
    if vector is not None:
        snapshot.latest.CopyFrom(vector)
    return weights_pb2.WatchWeightsResponse(
        cursor=common_pb2.WatchCursor(
            server_epoch=server_epoch,
            history_id=history_id,
            revision=vector.epoch if vector is not None else 0,
        ),
        snapshot=snapshot,
    )
