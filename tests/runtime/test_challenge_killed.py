"""Fault: a challenge process is killed under a running master with the local runtime.

The runtime restarts it; an epoch sealed meanwhile marks it FAILED with its reason and
pays the other challenge; once it runs again, the next epoch pays it again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from platform_common.chain import LocalSubnet
from platform_common.runtime import InstanceState
from platform_network.v1 import registry_pb2, weights_pb2
from tests.helpers import ACTIVE, create, set_status
from tests.support.master import start_master

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
IMAGES = {
    "native": "ghcr.io/platform-network/example-native:dev",
    "http": "ghcr.io/platform-network/example-http:dev",
}


async def test_a_killed_challenge_is_failed_meanwhile_and_restarted(tmp_path: Path) -> None:
    subnet = tmp_path / "chain.json"
    LocalSubnet.create(subnet, netuid=1, neurons=8, validators=2, manual_blocks=True)
    key = tmp_path / "token.key"
    key.write_text(os.urandom(32).hex())
    running = await start_master(
        f"sqlite+aiosqlite:///{tmp_path / 'platform.db'}",
        chain=f"local+file:{subnet}",
        hotkey="//platform-test/master",
        token_key_file=str(key),
        epochs=False,
        collect_timeout=3.0,
        runtime="local",
        runtime_images=str(REPO / "examples" / "images.json"),
        runtime_dir=str(tmp_path / "runtime"),
    )
    try:
        master = running.master
        for slug, image in IMAGES.items():
            await create(
                running.registry,
                slug,
                0.4,
                image=image,
                routes=registry_pb2.PublicRoutes(public_port=8000),
            )
            await set_status(running.registry, slug, ACTIVE)
        assert master.orchestrator is not None
        runtime = master.orchestrator._runtime
        deadline = time.monotonic() + 60
        while not all(
            i is not None and i.state is InstanceState.RUNNING
            for i in [await runtime.status(slug) for slug in IMAGES]
        ):
            assert time.monotonic() < deadline, "the examples never ran"
            await asyncio.sleep(0.1)
        assert master.epochs is not None
        first = await master.epochs.run_epoch()
        assert {r.slug: r.status for r in first.challenges} == {
            "http": weights_pb2.CHALLENGE_EPOCH_STATUS_EMPTY,
            "native": weights_pb2.CHALLENGE_EPOCH_STATUS_EMPTY,
        }

        before = await runtime.status("native")
        assert before is not None
        os.kill(before.pids["challenge"], signal.SIGKILL)
        # Sealed at once: the runtime's first restart waits out its backoff.
        during = await master.epochs.run_epoch()
        results = {r.slug: r for r in during.challenges}
        assert results["native"].status == weights_pb2.CHALLENGE_EPOCH_STATUS_FAILED
        assert results["native"].reason
        assert results["http"].status == weights_pb2.CHALLENGE_EPOCH_STATUS_EMPTY
        assert during.vector.epoch == first.vector.epoch + 1

        deadline = time.monotonic() + 60
        while True:
            after = await runtime.status("native")
            if (
                after is not None
                and after.state is InstanceState.RUNNING
                and after.restarts > before.restarts
            ):
                break
            assert time.monotonic() < deadline, f"not restarted: {after}"
            await asyncio.sleep(0.1)
        assert after.pids["challenge"] != before.pids["challenge"]
        again = await master.epochs.run_epoch()
        assert {r.slug: r.status for r in again.challenges}["native"] != (
            weights_pb2.CHALLENGE_EPOCH_STATUS_FAILED
        )
    finally:
        await running.close()
