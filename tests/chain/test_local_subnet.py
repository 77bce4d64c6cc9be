"""The simulated subnet's state file, clock and key helpers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from platform_common.chain import (
    LocalSubnet,
    SdkChain,
    SubmitOutcome,
    dev_keypair,
    open_chain,
    open_local_subnet,
)
from tests.chain.conftest import NETUID


async def wait_for_block(subnet: LocalSubnet, block: int) -> int:
    """Poll the head until it reaches ``block`` (bounded, so a stopped clock fails the test)."""
    for _ in range(400):
        head = await subnet.head()
        if head >= block:
            return head
        await asyncio.sleep(0.025)
    raise AssertionError(f"the head stayed at {await subnet.head()}, below {block}")


async def test_state_survives_a_reopen(
    chain: SdkChain, subnet: LocalSubnet, state_path: Path
) -> None:
    planned = chain.plan_weights({4: 1.0, 5: 0.5}, await chain.hyperparameters())
    result = await chain.set_weights(dev_keypair("hotkey", 0), planned)
    assert result.outcome is SubmitOutcome.SUBMITTED
    uid = await subnet.register(
        dev_keypair("hotkey", 300).ss58_address, dev_keypair("coldkey", 300).ss58_address
    )
    await subnet.advance(3)
    reopened = LocalSubnet.open(state_path)
    assert reopened.genesis_hash == subnet.genesis_hash
    assert await reopened.head() == 13
    assert await reopened.weights_set(0) == await subnet.weights_set(0)
    again = open_chain(f"local+file:{state_path}", NETUID)
    try:
        graph = await again.metagraph()
        assert graph.uid_of(dev_keypair("hotkey", 300).ss58_address) == uid
        assert graph.hotkey_of(0) == dev_keypair("hotkey", 0).ss58_address
    finally:
        await again.close()
    # The account nonce persisted too: the next submission is accepted, not a replay.
    await reopened.advance(10)
    second = await chain.set_weights(dev_keypair("hotkey", 0), planned)
    assert second.outcome is SubmitOutcome.SUBMITTED, second.message


async def test_two_instances_on_one_file_see_each_others_writes(
    subnet: LocalSubnet, state_path: Path
) -> None:
    other = open_local_subnet(f"local+file:{state_path}")
    assert isinstance(other, LocalSubnet)
    await other.advance(4)
    assert await subnet.head() == 4
    uid = await subnet.register(
        dev_keypair("hotkey", 400).ss58_address, dev_keypair("coldkey", 400).ss58_address
    )
    await other.set_neuron(uid, stake=12.5, validator_permit=True)
    chain = open_chain(f"local+file:{state_path}", NETUID)
    try:
        neuron = (await chain.metagraph()).neuron(uid)
        assert neuron is not None
        assert (neuron.stake, neuron.validator_permit) == (12.5, True)
    finally:
        await chain.close()


async def test_blocks_follow_the_clock_and_stop_while_paused(tmp_path: Path) -> None:
    subnet = LocalSubnet.create(tmp_path / "clock.json", neurons=2, validators=1, block_time=0.02)
    await wait_for_block(subnet, 3)
    paused_at = await subnet.pause()
    await asyncio.sleep(0.1)  # five block times
    assert await subnet.head() == paused_at
    document = json.loads((tmp_path / "clock.json").read_text())
    assert document["clock"] == {"block": paused_at, "since": None}
    resumed = LocalSubnet.open(tmp_path / "clock.json")  # opening resumes the clock
    assert await resumed.head() >= paused_at
    await wait_for_block(resumed, paused_at + 2)
    # The SDK's block subscription follows the simulated head.
    chain = open_chain(f"local+file:{tmp_path / 'clock.json'}", 1)
    try:
        assert isinstance(chain, SdkChain)
        start = await chain.current_block()
        header = await chain.client.wait_for_block(start + 2, timeout=10)
        assert header.number == start + 2
    finally:
        await chain.close()
    manual = LocalSubnet.open(tmp_path / "clock.json", manual_blocks=True)
    frozen = await manual.head()
    await asyncio.sleep(0.1)
    assert await manual.head() == frozen
    assert await manual.advance(5) == frozen + 5


def test_creation_refuses_bad_settings(tmp_path: Path, subnet: LocalSubnet) -> None:
    with pytest.raises(ValueError, match=r"validators: must be in 0..4"):
        LocalSubnet.create(tmp_path / "a.json", neurons=4, validators=5)
    with pytest.raises(ValueError, match="block_time: must be a positive number"):
        LocalSubnet.create(tmp_path / "b.json", block_time=0)
    with pytest.raises(FileExistsError, match="already exists"):
        LocalSubnet.create(subnet.path)
    with pytest.raises(FileNotFoundError, match="no simulated subnet state at"):
        LocalSubnet.open(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a simulated subnet state file"):
        LocalSubnet.open(tmp_path / "other.json")


def test_dev_keys_are_deterministic_sr25519_keys() -> None:
    first = dev_keypair("hotkey", 3)
    assert first.ss58_address == dev_keypair("hotkey", 3).ss58_address
    assert first.ss58_address != dev_keypair("coldkey", 3).ss58_address
    assert first.ss58_address != dev_keypair("hotkey", 4).ss58_address
    assert first.crypto_type == 1  # sr25519
    signature = first.sign(b"payload")
    assert first.verify(b"payload", signature)
    with pytest.raises(ValueError, match="role must be a non-empty word"):
        dev_keypair("a/b", 0)


def test_chain_urls_are_checked() -> None:
    with pytest.raises(ValueError, match="expected local\\+file:PATH, local\\+http://HOST:PORT"):
        open_chain("http://127.0.0.1:1", 1)
    with pytest.raises(ValueError, match="local\\+file:PATH needs a path"):
        open_local_subnet("local+file:")
    with pytest.raises(ValueError, match="is not a local simulated subnet"):
        open_local_subnet("finney")
