"""AUTH_POLICY_VALIDATOR: calls signed with a hotkey holding a validator permit.

A real master on a local subnet (uids 0..3 hold validator permits); the calls are
signed with ``platform_common.callauth``, as the validator agent signs them.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from platform_common import callauth
from platform_common.keys import load_signer
from platform_network.v1 import weights_pb2, weights_pb2_grpc
from tests.epochs.conftest import EpochMaster
from tests.support.master import ADMIN

LIST = "/platform_network.v1.Weights/ListEpochs"
VALIDATOR = load_signer("//platform-dev/hotkey/1")  # uid 1: a permit
MINER = load_signer("//platform-dev/hotkey/9")  # uid 9: registered, no permit
STRANGER = load_signer("//not-on-this-subnet")


def stub(master: EpochMaster) -> Any:
    return weights_pb2_grpc.WeightsStub(master.running.channel)


def failures(reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "platform_grpc_auth_failures_total", {"method": LIST, "reason": reason}
        )
        or 0.0
    )


async def refused(call: Any, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert text in (info.value.details() or "")


async def test_a_validator_with_a_permit_is_served(epoch_master: EpochMaster) -> None:
    request = weights_pb2.ListEpochsRequest(page_size=5)
    answer = await stub(epoch_master).ListEpochs(
        request, metadata=callauth.sign_call(VALIDATOR, LIST, request)
    )
    assert list(answer.epochs) == []


async def test_operators_keep_access_with_the_admin_token(epoch_master: EpochMaster) -> None:
    answer = await stub(epoch_master).ListEpochs(weights_pb2.ListEpochsRequest(), metadata=ADMIN)
    assert list(answer.epochs) == []


@pytest.mark.parametrize(
    ("case", "code", "text", "reason"),
    [
        ("unsigned", grpc.StatusCode.UNAUTHENTICATED, "missing credentials", "missing"),
        ("no_permit", grpc.StatusCode.PERMISSION_DENIED, "no validator permit", "no_permit"),
        ("unregistered", grpc.StatusCode.PERMISSION_DENIED, "no validator permit", "no_permit"),
        ("forged", grpc.StatusCode.UNAUTHENTICATED, "does not verify", "bad_signature"),
        ("stale", grpc.StatusCode.UNAUTHENTICATED, "signed more than", "stale"),
        ("other_method", grpc.StatusCode.UNAUTHENTICATED, "does not verify", "bad_signature"),
        ("other_body", grpc.StatusCode.UNAUTHENTICATED, "signed body hash", "body_mismatch"),
    ],
)
async def test_bad_signed_calls_are_refused(
    epoch_master: EpochMaster, case: str, code: grpc.StatusCode, text: str, reason: str
) -> None:
    request = weights_pb2.ListEpochsRequest(page_size=5)
    metadata: tuple[tuple[str, str], ...] = ()
    if case == "no_permit":
        metadata = callauth.sign_call(MINER, LIST, request)
    elif case == "unregistered":
        metadata = callauth.sign_call(STRANGER, LIST, request)
    elif case == "forged":
        # Signed by the miner, claiming the validator's hotkey.
        metadata = tuple(
            (k, VALIDATOR.ss58_address if k == callauth.HOTKEY else v)
            for k, v in callauth.sign_call(MINER, LIST, request)
        )
    elif case == "stale":
        metadata = callauth.sign_call(
            VALIDATOR, LIST, request, now_ns=time.time_ns() - 120 * 1_000_000_000
        )
    elif case == "other_method":
        metadata = callauth.sign_call(VALIDATOR, "/platform_network.v1.Weights/GetEpoch", request)
    elif case == "other_body":
        metadata = callauth.sign_call(VALIDATOR, LIST, weights_pb2.ListEpochsRequest(page_size=6))
    before = failures(reason)
    await refused(stub(epoch_master).ListEpochs(request, metadata=metadata), code, text)
    assert failures(reason) == before + 1


async def test_a_replayed_call_is_refused(epoch_master: EpochMaster) -> None:
    request = weights_pb2.ListEpochsRequest(page_size=5)
    metadata = callauth.sign_call(VALIDATOR, LIST, request)
    await stub(epoch_master).ListEpochs(request, metadata=metadata)
    await refused(
        stub(epoch_master).ListEpochs(request, metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
        "nonce was already used",
    )
