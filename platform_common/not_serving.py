"""How a shim says that it did not ask its challenge for weights because the challenge
is not healthy, and how the master recognizes it.

The shim checks the challenge's ``Health`` just before it forwards ``GetWeights``
(inside the pod, so the master makes one call per challenge and epoch). When the
challenge is not SERVING, the call fails with FAILED_PRECONDITION, the message
``health <STATE>[: <challenge's message>]`` and a ``google.rpc.ErrorInfo`` detail
(domain :data:`DOMAIN`, reason :data:`REASON`, metadata ``health_status``), which
tells it apart from an answer the shim refused (FAILED_PRECONDITION with a
``PreconditionFailure``).
"""

from __future__ import annotations

from typing import Protocol

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "platform-network.v1"
REASON = "CHALLENGE_NOT_SERVING"


def status(state: str, message: str) -> grpc.Status:
    """The status of a GetWeights not forwarded: the challenge's health is ``state``
    (e.g. "NOT_SERVING") with its ``message``."""
    text = f"health {state}: {message}" if message else f"health {state}"
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(reason=REASON, domain=DOMAIN, metadata={"health_status": state})
    )
    packed = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=text, details=[detail])
    result: grpc.Status = rpc_status.to_status(packed)
    return result


class _Failed(Protocol):
    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> object: ...


def reason_of(error: _Failed) -> str | None:
    """The message of a GetWeights the shim did not forward because the challenge is not
    healthy ("health NOT_SERVING: ..."); None for any other failure."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    try:
        rich = rpc_status.from_call(error)
    except ValueError:
        return None
    if rich is None:
        return None
    for detail in rich.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN and info.reason == REASON:
            message: str = rich.message
            return message
    return None
