"""set_weights through the SDK's SetWeights intent, applied by the simulated pallet."""

from __future__ import annotations

import dataclasses
import re

import bittensor as bt
import pytest

from platform_common.chain import (
    ChainWeights,
    LocalSubnet,
    SdkChain,
    SubmitOutcome,
    dev_keypair,
)
from platform_common.chain import extrinsic as ext
from platform_common.chain.extrinsic import ExtrinsicRejected
from tests.chain.conftest import NETUID, RATE_LIMIT

WEIGHTS = {3: 0.5, 4: 0.3, 5: 0.2, 6: 0.0}
VALIDATOR = 1  # uid 1 holds a validator permit
HASH = r"^0x[0-9a-f]{64}$"


async def test_set_weights_stores_the_planned_u16_values(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    planned = chain.plan_weights(WEIGHTS, await chain.hyperparameters())
    result = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), planned)
    assert result.outcome is SubmitOutcome.SUBMITTED, result.message
    assert result.block == 10
    assert result.message == "weights for 3 uids included in block 10"
    assert re.fullmatch(HASH, result.extrinsic_hash)
    stored = await subnet.weights_set(VALIDATOR)
    assert stored is not None
    assert (
        (stored.uids, stored.values)
        == (planned.uids, planned.values)
        == ((3, 4, 5), (65535, 39321, 26214))
    )
    assert stored.block == 10
    assert stored == await subnet.weights_set(dev_keypair("hotkey", VALIDATOR).ss58_address)
    # The SDK reads back the same row from the Weights storage map.
    row = await chain.client.query(("SubtensorModule", "Weights"), [NETUID, VALIDATOR])
    assert [tuple(pair) for pair in row] == list(zip(planned.uids, planned.values, strict=True))
    fractions = await chain.client.weights.weights(NETUID)
    assert fractions[VALIDATOR] == pytest.approx({3: 0.5, 4: 0.3, 5: 0.2}, abs=1e-4)


async def test_a_clipped_vector_is_accepted_by_the_pallets_exact_check(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    await subnet.set_hyperparameters(max_weight_limit=30000)
    planned = chain.plan_weights({2: 0.5, 3: 0.25, 5: 0.25}, await chain.hyperparameters())
    result = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), planned)
    assert result.outcome is SubmitOutcome.SUBMITTED, result.message
    stored = await subnet.weights_set(VALIDATOR)
    assert stored is not None
    assert stored.values == planned.values == (65535, 38814, 38813)


async def test_the_pallet_refuses_what_the_sdk_conversion_would_not_fix(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    # Raw u16 values straight to the extrinsic (no SetWeights conversion): the largest
    # share, 65535/143161, is a hair over the limit 30000/65535.
    await subnet.set_hyperparameters(max_weight_limit=30000)
    call = bt.calls.SubtensorModule.set_mechanism_weights(
        netuid=NETUID, mecid=0, dests=[2, 3, 5], weights=[65535, 38813, 38813], version_key=0
    )
    result = await chain.client.submit_call(call, dev_keypair("hotkey", VALIDATOR), signer="hotkey")
    assert not result.success
    assert result.error is not None
    assert result.error.name == "MaxWeightExceeded"
    assert await subnet.weights_set(VALIDATOR) is None


async def test_a_second_submission_within_the_rate_limit_is_rate_limited(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    planned = chain.plan_weights(WEIGHTS, await chain.hyperparameters())
    first = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), planned)
    assert first.outcome is SubmitOutcome.SUBMITTED
    await subnet.advance(RATE_LIMIT - 1)
    other = chain.plan_weights({3: 1.0}, await chain.hyperparameters())
    second = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), other)
    assert second.outcome is SubmitOutcome.RATE_LIMITED
    assert second.next_allowed_block == first.block + RATE_LIMIT == 15
    assert second.block == 14
    assert second.extrinsic_hash == ""
    assert f"the rate limit is {RATE_LIMIT} blocks" in second.message
    stored = await subnet.weights_set(VALIDATOR)
    assert stored is not None
    assert stored.uids == planned.uids  # unchanged
    await subnet.advance(1)
    third = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), other)
    assert third.outcome is SubmitOutcome.SUBMITTED, third.message
    assert third.block == 15
    stored = await subnet.weights_set(VALIDATOR)
    assert stored is not None
    assert stored.uids == (3,)


async def test_commit_reveal_commits_a_timelocked_vector(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    await subnet.set_hyperparameters(commit_reveal=True)
    hyperparameters = await chain.hyperparameters()
    assert hyperparameters.commit_reveal_enabled
    planned = chain.plan_weights(WEIGHTS, hyperparameters)
    result = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), planned)
    assert result.outcome is SubmitOutcome.COMMITTED, result.message
    assert result.reveal_round > 0
    assert f"reveals it at drand round {result.reveal_round}" in result.message
    # The SDK chose commit_timelocked_mechanism_weights and encrypted the vector: the chain
    # holds a ciphertext for the drand round, not the weights.
    (commit,) = await subnet.commits(VALIDATOR)
    assert commit.hotkey == dev_keypair("hotkey", VALIDATOR).ss58_address
    assert (commit.block, commit.reveal_round) == (10, result.reveal_round)
    assert commit.commit_reveal_version == 4
    assert len(commit.commit) > 200
    assert commit.commit.startswith("0x")
    assert await subnet.weights_set(VALIDATOR) is None
    pending = await chain.client.weights.timelocked_weight_commits(NETUID)
    assert [c["reveal_round"] for c in pending[commit.epoch]] == [result.reveal_round]
    # Commits are rate limited like plain submissions.
    again = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), planned)
    assert again.outcome is SubmitOutcome.RATE_LIMITED
    assert again.next_allowed_block == 10 + RATE_LIMIT


@pytest.mark.parametrize(
    ("signer", "message"),
    [
        (dev_keypair("hotkey", 6), "NeuronNoValidatorPermit: The caller is attempting to set "
         "non-self weights without being a permitted validator."),
        (dev_keypair("hotkey", 900), "is not registered on netuid 7"),
    ],
)  # fmt: skip
async def test_refusals_are_reported_as_failed(
    chain: SdkChain, signer: bt.Signer, message: str
) -> None:
    planned = chain.plan_weights(WEIGHTS, await chain.hyperparameters())
    result = await chain.set_weights(signer, planned)
    assert result.outcome is SubmitOutcome.FAILED
    assert message in result.message
    assert result.extrinsic_hash == ""


async def test_an_outdated_version_key_is_refused(chain: SdkChain, subnet: LocalSubnet) -> None:
    await subnet.set_hyperparameters(weights_version=5)
    planned = chain.plan_weights(WEIGHTS, await chain.hyperparameters())
    assert planned.version_key == 5
    outdated = dataclasses.replace(planned, version_key=4)
    refused = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), outdated)
    assert refused.outcome is SubmitOutcome.FAILED
    assert refused.message.startswith("IncorrectWeightVersionKey:")
    accepted = await chain.set_weights(dev_keypair("hotkey", VALIDATOR), planned)
    assert accepted.outcome is SubmitOutcome.SUBMITTED, accepted.message
    stored = await subnet.weights_set(VALIDATOR)
    assert stored is not None
    assert stored.version_key == 5


async def test_the_chain_checks_signatures_and_nonces(subnet: LocalSubnet) -> None:
    keypair = dev_keypair("hotkey", VALIDATOR)
    call = bt.calls.SubtensorModule.set_mechanism_weights(
        netuid=NETUID, mecid=0, dests=[3], weights=[65535], version_key=0
    )
    signed = await ext.sign(call, keypair, nonce=0, era=None, genesis_hash=subnet.genesis_hash)
    forged = {
        **signed,
        "call": {**signed["call"], "params": {**signed["call"]["params"], "dests": [4]}},
    }
    with pytest.raises(ExtrinsicRejected, match="bad signature"):
        await subnet.submit(forged)
    elsewhere = await ext.sign(call, keypair, nonce=0, era=None, genesis_hash="0x" + "11" * 32)
    with pytest.raises(ExtrinsicRejected, match="another chain"):
        await subnet.submit(elsewhere)
    receipt = await subnet.submit(signed)
    assert receipt.success
    assert receipt.extrinsic_hash == ext.extrinsic_hash(signed)
    with pytest.raises(ExtrinsicRejected, match="outdated"):
        await subnet.submit(signed)  # a replay
    assert await subnet.next_nonce(keypair.ss58_address) == 1


def test_chain_weights_keep_their_pairs() -> None:
    weights = ChainWeights((1, 4), (65535, 7), 65535, 1, 0)
    assert weights.as_mapping() == {1: 65535, 4: 7}
