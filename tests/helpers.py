"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from platform_network.v1 import registry_pb2, registry_pb2_grpc
from tests.support.master import ADMIN


def spec(slug: str, share: float = 0.1, **fields: Any) -> registry_pb2.ChallengeSpec:
    values: dict[str, Any] = {
        "slug": slug,
        "name": slug.replace("-", " ").title(),
        "image": f"ghcr.io/platform-test/{slug}:1.0.0",
        "emission_share": share,
    }
    values.update(fields)
    return registry_pb2.ChallengeSpec(**values)


async def create(
    stub: registry_pb2_grpc.RegistryAsyncStub, slug: str, share: float = 0.1, **fields: Any
) -> registry_pb2.CreateChallengeResponse:
    return await stub.CreateChallenge(
        registry_pb2.CreateChallengeRequest(challenge=spec(slug, share, **fields)), metadata=ADMIN
    )


async def set_status(
    stub: registry_pb2_grpc.RegistryAsyncStub,
    slug: str,
    status: registry_pb2.ChallengeStatus.ValueType,
    **fields: Any,
) -> registry_pb2.Challenge:
    return await stub.SetChallengeStatus(
        registry_pb2.SetChallengeStatusRequest(slug=slug, status=status, **fields), metadata=ADMIN
    )


async def refused(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await ``call``, which must fail with ``code``; return the error for message checks."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


ACTIVE = registry_pb2.CHALLENGE_STATUS_ACTIVE
INACTIVE = registry_pb2.CHALLENGE_STATUS_INACTIVE
DISABLED = registry_pb2.CHALLENGE_STATUS_DISABLED
DRAFT = registry_pb2.CHALLENGE_STATUS_DRAFT
