"""When epochs are sealed, and what happens when one cannot be."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from master.weights.endpoints import ShimEndpointsFile
from master.weights.epochs import EpochNotSealed, tempo_position
from platform_network.v1 import common_pb2, weights_pb2
from tests.epochs.conftest import (
    EpochMaster,
    Subnet,
    read,
    sealed_vectors,
    start_epoch_master,
    tempo_schedule,
    tempo_subnet,
)
from tests.helpers import refused
from tests.support.master import ADMIN

# The stores run on both backends in test_weights_service; scheduling needs one.
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def test_tempo_position_counts_down_to_the_subnets_epoch_block() -> None:
    # netuid 1, tempo 10: subtensor runs the subnet's epoch when (block + 2) % 11 == 0.
    assert tempo_position(9, 1, 10) == (1, 10)  # the epoch block itself: a new cycle starts
    assert tempo_position(10, 1, 10) == (1, 9)
    assert tempo_position(18, 1, 10) == (1, 1)
    assert tempo_position(19, 1, 10) == (1, 0)
    assert tempo_position(20, 1, 10) == (2, 10)


@on_sqlite
async def test_tempo_schedule_seals_once_per_tempo_inside_the_lead(
    database_url: str, tmp_path: Path, token_key_file: Path
) -> None:
    tempo, lead = 12, 4
    subnet = tempo_subnet(tmp_path, tempo=tempo, block_time=0.05)
    master = await start_epoch_master(
        database_url, subnet, token_key_file, **tempo_schedule(lead=lead, block_time=0.05)
    )
    try:
        sealed = await sealed_vectors(master, 3)
    finally:
        await master.close()
    slots = []
    for vector in sealed:
        slot, remaining = tempo_position(vector.metagraph_block, 1, tempo)
        assert remaining <= lead, (vector.metagraph_block, remaining)
        slots.append(slot)
    assert slots == sorted(set(slots)), f"one epoch per tempo: {slots}"
    # The default lifetime is two epoch periods: 2 x (tempo + 1) blocks.
    lifetime = sealed[0].expire_time.ToDatetime() - sealed[0].create_time.ToDatetime()
    assert lifetime.total_seconds() == pytest.approx(2 * (tempo + 1) * 0.05)


@on_sqlite
async def test_interval_schedule_default_lifetime_is_two_intervals(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> None:
    master = await start_epoch_master(
        database_url,
        subnet,
        token_key_file,
        epochs=True,
        epoch_schedule="interval",
        epoch_interval=30.0,
    )
    try:
        stream = master.weights.WatchWeights(
            weights_pb2.WatchWeightsRequest(since_epoch=0), metadata=ADMIN
        )
        async for message in stream:
            if message.HasField("vector") or message.snapshot.HasField("latest"):
                vector = message.vector if message.HasField("vector") else message.snapshot.latest
                break
        stream.cancel()
    finally:
        await master.close()
    lifetime = vector.expire_time.ToDatetime() - vector.create_time.ToDatetime()
    assert lifetime.total_seconds() == 60.0


@on_sqlite
async def test_no_vector_is_sealed_when_the_burn_uid_is_not_in_the_metagraph(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> None:
    master = await start_epoch_master(database_url, subnet, token_key_file, burn_uid=40)
    try:
        with pytest.raises(EpochNotSealed) as info:
            await master.seal()
        assert info.value.outcome == "burn_uid_missing"
        assert "burn UID 40 is not in the metagraph" in str(info.value)
        await refused(
            master.weights.GetLatestWeights(weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN),
            grpc.StatusCode.NOT_FOUND,
        )
    finally:
        await master.close()


@on_sqlite
async def test_no_vector_is_sealed_when_the_sdk_refuses_the_conversion(
    epoch_master: EpochMaster, subnet: Subnet
) -> None:
    first = await epoch_master.seal()
    # An all-burn vector has one non-zero weight; the subnet now wants at least two.
    await subnet.local.set_hyperparameters(min_allowed_weights=2)
    counted = REGISTRY.get_sample_value("platform_epochs_total", {"outcome": "conversion_refused"})
    with pytest.raises(EpochNotSealed) as info:
        await epoch_master.seal()
    assert info.value.outcome == "conversion_refused"
    # Operators see it in the metric the guide names.
    assert (
        REGISTRY.get_sample_value("platform_epochs_total", {"outcome": "conversion_refused"})
        == (counted or 0) + 1
    )
    latest = await epoch_master.weights.GetLatestWeights(
        weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN
    )
    assert latest == first.vector  # the previous vector stays the latest


@on_sqlite
async def test_pruned_epochs_make_old_positions_resync_as_compacted(
    database_url: str, subnet: Subnet, token_key_file: Path
) -> None:
    master = await start_epoch_master(
        database_url,
        subnet,
        token_key_file,
        epoch_retention=1,
        compaction_interval=0.05,
    )
    try:
        first = (await master.seal()).vector
        for _ in range(2):
            await master.seal()
        for _ in range(200):  # pruning runs with the compactor, every 0.05 s here
            listed = await master.weights.ListEpochs(
                weights_pb2.ListEpochsRequest(), metadata=ADMIN
            )
            if len(listed.epochs) == 1:
                break
            await asyncio.sleep(0.05)
        assert [e.epoch for e in listed.epochs] == [3]
        await refused(
            master.weights.GetEpoch(weights_pb2.GetEpochRequest(epoch=2), metadata=ADMIN),
            grpc.StatusCode.NOT_FOUND,
        )
        stream = master.weights.WatchWeights(
            weights_pb2.WatchWeightsRequest(since_epoch=1, history_id=first.history_id),
            metadata=ADMIN,
        )
        message = await read(stream)
        stream.cancel()
        assert message.snapshot.reason == common_pb2.SNAPSHOT_REASON_COMPACTED
        assert message.snapshot.latest.epoch == 3
    finally:
        await master.close()


async def test_shim_endpoints_file_is_reread_and_a_bad_one_keeps_the_last_good(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shims.json"
    path.write_text(json.dumps({"a": "127.0.0.1:1000"}))
    placement = ShimEndpointsFile(path)
    assert await placement.addresses() == {"a": "127.0.0.1:1000"}
    path.write_text(json.dumps({"a": "127.0.0.1:1000", "b": "127.0.0.1:2000"}))
    assert await placement.addresses() == {"a": "127.0.0.1:1000", "b": "127.0.0.1:2000"}
    path.write_text(json.dumps({"a": "no port here"}))
    assert await placement.addresses() == {"a": "127.0.0.1:1000", "b": "127.0.0.1:2000"}
    path.unlink()
    assert await placement.addresses() == {"a": "127.0.0.1:1000", "b": "127.0.0.1:2000"}


async def test_shim_endpoints_file_follows_a_configmap_update(tmp_path: Path) -> None:
    """The kubelet's layout of a ConfigMap volume: the file is a symlink through
    ``..data``, and an update swaps ``..data`` to a new directory at once."""

    def publish(version: int, content: dict[str, str]) -> None:
        directory = tmp_path / f"..version-{version}"
        directory.mkdir()
        (directory / "placement.json").write_text(json.dumps(content))
        (tmp_path / "..data-new").symlink_to(directory.name)
        (tmp_path / "..data-new").replace(tmp_path / "..data")

    publish(1, {"a": "127.0.0.1:1000"})
    path = tmp_path / "placement.json"
    path.symlink_to("..data/placement.json")
    placement = ShimEndpointsFile(path)
    assert await placement.addresses() == {"a": "127.0.0.1:1000"}
    publish(2, {"a": "127.0.0.1:3000"})
    # The same size and, as within one tick of a coarse file-system clock, the same time.
    first = (tmp_path / "..version-1" / "placement.json").stat().st_mtime_ns
    os.utime(tmp_path / "..version-2" / "placement.json", ns=(first, first))
    assert await placement.addresses() == {"a": "127.0.0.1:3000"}
