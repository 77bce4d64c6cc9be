"""Turn a :class:`~platform_common.refusals.Refusal` into a rich gRPC status."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from platform_common.refusals import Refusal


def to_grpc_status(refusal: Refusal) -> grpc.Status:
    code = getattr(code_pb2, refusal.kind.value)
    status = status_pb2.Status(code=code, message=refusal.message)
    if refusal.violations:
        _pack(
            status,
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in refusal.violations
                ]
            ),
        )
    if refusal.precondition is not None:
        kind, subject = refusal.precondition
        _pack(
            status,
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=kind, subject=subject, description=refusal.message
                    )
                ]
            ),
        )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _pack(
    status: status_pb2.Status,
    detail: error_details_pb2.BadRequest | error_details_pb2.PreconditionFailure,
) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)
