"""Builders for the validator tests: vectors signed by the real signing code, agents."""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Mapping
from typing import Any

from platform_common import vectors
from platform_common.chain import Chain, ChainWeights, Hyperparameters, Metagraph, SubmitResult
from platform_common.keys import Signer, load_signer
from platform_network.v1 import weights_pb2
from validator.config import ValidatorConfig

MASTER_KEY = "//platform-test/master"
OTHER_KEY = "//platform-test/impostor"
VALIDATOR_UID = 1
VALIDATOR_KEY = f"//platform-dev/hotkey/{VALIDATOR_UID}"
NS = 1_000_000_000


@functools.cache
def signer(uri: str) -> Signer:
    return load_signer(uri)


def master_hotkey() -> str:
    return signer(MASTER_KEY).ss58_address


def make_vector(
    epoch: int = 1,
    *,
    history_id: str = "history-a",
    netuid: int = 1,
    mechanism_id: int = 0,
    created_ns: int | None = None,
    lifetime: float = 600.0,
    weights: tuple[tuple[int, float], ...] = ((0, 1.0),),
    chain_form: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    version_key: int = 0,
    key: str = MASTER_KEY,
) -> weights_pb2.WeightVector:
    """A vector signed with ``key`` by ``platform_common.vectors.sign_vector``."""
    created = time.time_ns() if created_ns is None else created_ns
    if chain_form is None:
        top = max(w for _, w in weights)
        chain_form = (
            tuple(u for u, _ in weights),
            tuple(round(w / top * 65535) for _, w in weights),
        )
    vector = weights_pb2.WeightVector(
        netuid=netuid,
        mechanism_id=mechanism_id,
        epoch=epoch,
        epoch_id=uuid.uuid4().hex,
        history_id=history_id,
        metagraph_block=10,
        policy=weights_pb2.SHARE_POLICY_BURN,
        burn_uid=0,
        weights=[weights_pb2.UidWeight(uid=u, hotkey="", weight=w) for u, w in weights],
        chain_weights=weights_pb2.ChainWeights(
            uids=chain_form[0],
            values=chain_form[1],
            max_weight_limit=65535,
            min_allowed_weights=1,
            version_key=version_key,
        ),
        inputs_sha256=bytes(32),
    )
    vector.create_time.FromNanoseconds(created)
    vector.expire_time.FromNanoseconds(created + int(lifetime * NS))
    vectors.sign_vector(vector, signer(key))
    return vector


def agent_config(**overrides: Any) -> ValidatorConfig:
    """Settings for an in-process agent: quick reconnects and polls, no metrics port."""
    values: dict[str, Any] = {
        "master_hotkey": master_hotkey(),
        "hotkey": VALIDATOR_KEY,
        "metrics_listen": "",
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        "report_retry_max": 0.5,
        "submit_retry_delay": 0.1,
        "chain_poll_interval": 0.05,
        "shutdown_grace": 5.0,
    }
    values.update(overrides)
    return dataclasses.replace(ValidatorConfig(), **values)


class ChainInFront:
    """The real chain, every call passed through; subclasses change ``set_weights`` to
    show what a real node cannot be made to do on demand (lose an answer, hang)."""

    def __init__(self, chain: Chain) -> None:
        self._chain = chain
        self.netuid = chain.netuid

    async def current_block(self) -> int:
        return await self._chain.current_block()

    async def metagraph(self, block: int | None = None) -> Metagraph:
        return await self._chain.metagraph(block)

    async def hyperparameters(self, block: int | None = None) -> Hyperparameters:
        return await self._chain.hyperparameters(block)

    def plan_weights(
        self, weights: Mapping[int, float], hyperparameters: Hyperparameters
    ) -> ChainWeights:
        return self._chain.plan_weights(weights, hyperparameters)

    async def set_weights(
        self, keypair: Any, weights: ChainWeights, *, mechanism_id: int = 0
    ) -> SubmitResult:
        return await self._chain.set_weights(keypair, weights, mechanism_id=mechanism_id)

    async def close(self) -> None:
        await self._chain.close()
