"""Metagraph and hyperparameter reads through the real SDK over the simulated subnet."""

from __future__ import annotations

import bittensor as bt
import pytest

from platform_common.chain import (
    LocalSubnet,
    Metagraph,
    Neuron,
    SdkChain,
    SubnetNotFoundError,
    dev_keypair,
    open_chain,
)
from tests.chain.conftest import NETUID, NEURONS, RATE_LIMIT, VALIDATORS


def hotkey(index: int) -> str:
    return str(dev_keypair("hotkey", index).ss58_address)


def coldkey(index: int) -> str:
    return str(dev_keypair("coldkey", index).ss58_address)


async def test_metagraph_has_the_dev_neurons_with_permits_and_stakes(chain: SdkChain) -> None:
    graph = await chain.metagraph()
    assert graph.netuid == NETUID
    assert graph.block == await chain.current_block() == 10
    assert [n.uid for n in graph.neurons] == list(range(NEURONS))
    assert [n.hotkey for n in graph.neurons] == [hotkey(uid) for uid in range(NEURONS)]
    assert [n.coldkey for n in graph.neurons] == [coldkey(uid) for uid in range(NEURONS)]
    assert [n.validator_permit for n in graph.neurons] == [True] * 3 + [False] * 5
    assert [n.stake for n in graph.neurons] == pytest.approx([1000.0, 900.0, 810.0] + [0.0] * 5)
    assert all(n.hotkey.startswith("5") for n in graph.neurons)  # SS58 format 42
    # The same answer as the SDK's own typed metagraph, which this one is decoded from.
    sdk_graph = await chain.client.subnets.metagraph(NETUID, commitments=False)
    assert sdk_graph is not None
    assert sdk_graph.hotkeys == [n.hotkey for n in graph.neurons]
    assert [n.uid for n in sdk_graph.validators] == list(range(VALIDATORS))


async def test_uid_lookups_follow_the_hotkey_mapping(chain: SdkChain) -> None:
    graph = await chain.metagraph()
    assert graph.uid_of(hotkey(5)) == 5
    assert graph.hotkey_of(5) == hotkey(5)
    assert graph.uid_of(hotkey(500)) is None
    assert graph.hotkey_of(NEURONS) is None
    assert graph.hotkey_to_uid is graph.hotkey_to_uid  # built once
    with pytest.raises(TypeError):
        graph.hotkey_to_uid[hotkey(500)] = 1  # type: ignore[index]


async def test_a_registration_on_a_full_subnet_hands_a_uid_to_the_new_hotkey(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    before = await chain.metagraph()
    await subnet.advance(1)  # block 10 is final; changes land in the head block, 11
    newcomer = hotkey(100)
    uid = await subnet.register(newcomer, coldkey(100))
    # Full subnet: the non-validator with the least stake, oldest first, is pruned.
    assert uid == VALIDATORS
    after = await chain.metagraph()
    assert after.block == 11
    assert after.uid_of(newcomer) == VALIDATORS
    assert after.uid_of(hotkey(VALIDATORS)) is None  # the pruned hotkey lost its uid
    assert after.hotkey_of(VALIDATORS) == newcomer
    assert after.neuron(VALIDATORS) == Neuron(VALIDATORS, newcomer, coldkey(100), False, 0.0)
    assert len(after.neurons) == NEURONS
    # The earlier block still answers with the earlier holder.
    again = await chain.metagraph(block=before.block)
    assert again == before
    assert again.uid_of(hotkey(VALIDATORS)) == VALIDATORS
    assert again.uid_of(newcomer) is None
    # The next registration prunes the next oldest miner, not the newcomer.
    assert await subnet.register(hotkey(101), coldkey(101)) == VALIDATORS + 1


async def test_replace_and_refusals_of_the_registration_controls(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    await subnet.replace(6, hotkey(200), coldkey(200), stake=50.0, validator_permit=True)
    graph = await chain.metagraph()
    assert graph.neuron(6) == Neuron(6, hotkey(200), coldkey(200), True, 50.0)
    with pytest.raises(ValueError, match=r"hotkey: .* is already registered at uid 6"):
        await subnet.register(hotkey(200), coldkey(200))
    with pytest.raises(ValueError, match="hotkey: 'not-an-address' is not an SS58 address"):
        await subnet.register("not-an-address", coldkey(1))
    with pytest.raises(ValueError, match=r"uid: 8 is not a uid of this subnet \(0..7\)"):
        await subnet.replace(8, hotkey(201), coldkey(201))


async def test_hyperparameters_at_the_head_and_at_an_earlier_block(
    chain: SdkChain, subnet: LocalSubnet
) -> None:
    first = await chain.hyperparameters()
    assert (first.netuid, first.block, first.tempo) == (NETUID, 10, 20)
    assert first.weights_rate_limit == RATE_LIMIT
    assert first.max_weight_limit == 65535
    assert first.min_allowed_weights == 1
    assert first.commit_reveal_enabled is False
    assert first.weights_version == 0
    await subnet.advance(2)
    await subnet.set_hyperparameters(
        max_weight_limit=20000, min_allowed_weights=3, commit_reveal=True, weights_version=9
    )
    second = await chain.hyperparameters()
    assert second.block == 12
    assert (second.max_weight_limit, second.min_allowed_weights) == (20000, 3)
    assert (second.commit_reveal_enabled, second.weights_version) == (True, 9)
    assert await chain.hyperparameters(block=10) == first


async def test_hyperparameter_changes_are_checked(subnet: LocalSubnet) -> None:
    with pytest.raises(ValueError, match=r"max_weight_limit: must be an integer in 0..65535"):
        await subnet.set_hyperparameters(max_weight_limit=70000)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['kappa'\]"):
        await subnet.set_hyperparameters(kappa=3)


async def test_an_unknown_netuid_is_reported(subnet: LocalSubnet, state_path: object) -> None:
    elsewhere = open_chain(f"local+file:{state_path}", NETUID + 1)
    try:
        with pytest.raises(SubnetNotFoundError, match=f"netuid {NETUID + 1} does not exist"):
            await elsewhere.metagraph()
        with pytest.raises(SubnetNotFoundError, match=f"netuid {NETUID + 1} does not exist"):
            await elsewhere.hyperparameters()
    finally:
        await elsewhere.close()


async def test_blocks_outside_the_chain_are_refused(chain: SdkChain, subnet: LocalSubnet) -> None:
    with pytest.raises(bt.ChainError, match=r"block 11 has not been produced \(the head is 10\)"):
        await chain.metagraph(block=11)
    await subnet.advance(subnet.history_blocks + 5)
    with pytest.raises(bt.ChainError, match="State already discarded for block 10"):
        await chain.metagraph(block=10)


def test_metagraph_values_refuse_an_inconsistent_graph() -> None:
    a = Neuron(0, hotkey(0), coldkey(0), True, 1.0)
    b = Neuron(1, hotkey(1), coldkey(1), False, 0.0)
    with pytest.raises(ValueError, match="strictly ascending uid"):
        Metagraph(1, 5, (b, a))
    with pytest.raises(ValueError, match="only one uid"):
        Metagraph(1, 5, (a, Neuron(1, hotkey(0), coldkey(1), False, 0.0)))
