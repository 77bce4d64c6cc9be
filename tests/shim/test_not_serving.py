"""The status a shim answers for a challenge it did not ask for weights (not SERVING),
and the master's reading of it: told apart from every other failure."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from platform_common import not_serving


def as_error(status: grpc.Status) -> grpc.aio.AioRpcError:
    """What the master's call raises when the shim aborts with ``status``."""
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )


@pytest.mark.parametrize(
    ("state", "message", "text"),
    [
        ("NOT_SERVING", "fault injected", "health NOT_SERVING: fault injected"),
        ("STARTING", "", "health STARTING"),
        ("DRAINING", "going away", "health DRAINING: going away"),
    ],
)
def test_the_reason_survives_the_round_trip(state: str, message: str, text: str) -> None:
    status = not_serving.status(state, message)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.details == text
    assert not_serving.reason_of(as_error(status)) == text


def refused_answer() -> grpc.Status:
    """A refused weights answer: FAILED_PRECONDITION with a PreconditionFailure."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="SCORE", subject="entries[0].score", description="NaN"
                )
            ]
        )
    )
    packed = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="entries[0].score: NaN", details=[detail]
    )
    result: grpc.Status = rpc_status.to_status(packed)
    return result


def foreign_error_info() -> grpc.Status:
    """FAILED_PRECONDITION with the same reason from another domain."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=not_serving.REASON, domain="elsewhere"))
    packed = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="health NOT_SERVING", details=[detail]
    )
    result: grpc.Status = rpc_status.to_status(packed)
    return result


@pytest.mark.parametrize(
    "error",
    [
        as_error(refused_answer()),
        as_error(foreign_error_info()),
        # The right message without the detail: a challenge's own words, not the shim's.
        grpc.aio.AioRpcError(
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "health NOT_SERVING: x",
        ),
        # The detail under another code.
        grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*not_serving.status("NOT_SERVING", "x").trailing_metadata),
            "health NOT_SERVING: x",
        ),
    ],
    ids=["refused-answer", "other-domain", "no-detail", "other-code"],
)
def test_every_other_failure_is_not_taken_for_it(error: grpc.aio.AioRpcError) -> None:
    assert not_serving.reason_of(error) is None
