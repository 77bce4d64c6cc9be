"""``platform validator --run-challenges``: the agent runs the registry's ACTIVE challenges
through the local runtime, driven by its ``WatchRegistry`` stream from a real master.

Real processes throughout: the example challenge and its ``platform shim`` started by
the agent's runtime, called over gRPC with the token the agent gave the instance.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from platform_common.runtime import InstanceState
from platform_network.v1 import registry_pb2
from tests.helpers import ACTIVE, INACTIVE, create, set_status
from tests.runtime.support import (
    ALICE,
    IMAGE_MAP,
    NATIVE,
    Runtimes,
    alive,
    get_weights,
    solve,
    wait_state,
    weights_refused,
)
from tests.support.waiting import eventually
from tests.validator.test_agent_master import Site, make_site, start_agent, start_master
from validator.agent import Agent, StartupError
from validator.challenges import TOKENS_FILE, InstanceTokens, StreamedRegistry, TokenFileError
from validator.store import Cursor, Store

pytestmark = pytest.mark.process

SLUG = "sum-bench"


def settings(runtime_dir: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "run_challenges": True,
        "runtime_images": str(IMAGE_MAP),
        "runtime_dir": str(runtime_dir),
    }
    values.update(overrides)
    return values


def tokens_in(runtime_dir: Path) -> dict[str, str]:
    tokens: dict[str, str] = json.loads((runtime_dir / TOKENS_FILE).read_text())["tokens"]
    return tokens


@pytest.fixture
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return await make_site("sqlite", request, tmp_path)


async def test_the_agent_runs_what_the_registry_makes_active(site: Site, tmp_path: Path) -> None:
    master = await start_master(site)
    runtime_dir = tmp_path / "validator-runtime"
    net = Runtimes(runtime_dir)  # stops by PID whatever a failing test leaves behind
    agent: Agent | None = None
    try:
        created = await create(master.registry, SLUG, 0.5, image=f"{NATIVE}:1.0.0")
        await create(master.registry, "mystery", 0.1, image="ghcr.io/nobody/unknown:1.0.0")
        await set_status(master.registry, SLUG, ACTIVE)
        await set_status(master.registry, "mystery", ACTIVE)
        agent = await start_agent(
            site, master.address, **settings(runtime_dir, runtime_keep_on_exit=True)
        )
        assert agent.runtime is not None

        # ACTIVE: started with its shim, behind a token of this validator's own.
        first = await wait_state(net, agent.runtime, SLUG)
        token = tokens_in(runtime_dir)[SLUG]
        assert (runtime_dir / TOKENS_FILE).stat().st_mode & 0o777 == 0o600
        assert first.shim_address
        assert first.public_address
        await solve(first.public_address, ALICE, task_id=2)
        assert await get_weights(first.shim_address, token) == [(ALICE, 1.0)]
        assert await weights_refused(first.shim_address, created.token) is (
            grpc.StatusCode.UNAUTHENTICATED
        ), "the registry token must not open a validator's instance"
        assert await weights_refused(first.shim_address, "x" * 43) is (
            grpc.StatusCode.UNAUTHENTICATED
        )

        # An image the map does not know: FAILED, said in /healthz, the other one runs.
        failed = await wait_state(net, agent.runtime, "mystery", InstanceState.FAILED)
        assert "ghcr.io/nobody/unknown" in failed.message

        async def reported() -> dict[str, Any] | None:
            assert agent is not None
            healthy, details = agent.health()
            challenges: dict[str, Any] = details["challenges"]
            both = challenges.get(SLUG, {}).get("state") == "RUNNING" and "mystery" in challenges
            return challenges if healthy and both else None

        health = await eventually(reported, within=10, what="instances in /healthz")
        assert health["mystery"]["state"] == "FAILED"
        assert "ghcr.io/nobody/unknown" in health["mystery"]["detail"]

        # INACTIVE: stopped within seconds, its token forgotten.
        await set_status(master.registry, SLUG, INACTIVE)

        async def stopped() -> bool:
            assert agent is not None
            assert agent.runtime is not None
            return await agent.runtime.status(SLUG) is None

        await eventually(stopped, within=30, what=f"{SLUG} stopped")
        assert not any(alive(pid) for pid in first.pids.values())
        assert SLUG not in tokens_in(runtime_dir)

        # ACTIVE again: a new instance under a new token.
        await set_status(master.registry, SLUG, ACTIVE)
        second = await wait_state(net, agent.runtime, SLUG, unless_pids=first.pids.values())
        assert second.shim_address
        renewed = tokens_in(runtime_dir)[SLUG]
        assert renewed != token
        assert await get_weights(second.shim_address, renewed) == []

        # Agent restarted (--runtime-keep-on-exit): the instance is adopted, not restarted.
        await agent.stop()
        agent = None
        assert all(alive(pid) for pid in second.pids.values())
        agent = await start_agent(site, master.address, **settings(runtime_dir))
        assert agent.runtime is not None
        adopted = await wait_state(net, agent.runtime, SLUG)
        assert adopted.pids == second.pids
        assert adopted.restarts == 0
        assert await get_weights(second.shim_address, renewed) == []

        # Stopped without --runtime-keep-on-exit: nothing is left running.
        await agent.stop()
        agent = None
        assert not any(alive(pid) for pid in second.pids.values())
    finally:
        if agent is not None:
            await agent.stop()
        await master.close()
        await net.cleanup()


async def test_one_agent_per_runtime_directory(site: Site, tmp_path: Path) -> None:
    master = await start_master(site)
    runtime_dir = tmp_path / "validator-runtime"
    agent = await start_agent(site, master.address, **settings(runtime_dir))
    try:
        with pytest.raises(StartupError, match=r"--run-challenges: .*runtime"):
            await start_agent(site, master.address, **settings(runtime_dir))
        assert agent.health()[0], "the running agent is untouched by the refused one"
    finally:
        await agent.stop()
        await master.close()
    # The lock went with the agent: the directory can be used again.
    again = await start_agent(site, master.address, **settings(runtime_dir))
    await again.stop()


async def test_a_damaged_tokens_file_stops_the_start_by_name(site: Site, tmp_path: Path) -> None:
    runtime_dir = tmp_path / "validator-runtime"
    runtime_dir.mkdir()
    (runtime_dir / TOKENS_FILE).write_text('{"version": 1, "tokens": {"sum-bench": ""}}\n')
    with pytest.raises(StartupError, match=r"--runtime-dir: .*tokens\.json: not a tokens file"):
        await start_agent(site, "127.0.0.1:9", **settings(runtime_dir))
    # Refused before anything ran, and the directory is not left locked.
    (runtime_dir / TOKENS_FILE).unlink()
    agent = await start_agent(site, "127.0.0.1:9", **settings(runtime_dir))
    await agent.stop()


def test_instance_tokens_are_minted_once_kept_private_and_forgotten(tmp_path: Path) -> None:
    path = tmp_path / TOKENS_FILE
    tokens = InstanceTokens(path)
    one = tokens.token("one")
    two = tokens.token("two")
    assert one != two
    assert len(one) >= 43  # 32 random bytes, URL-safe base64
    assert tokens.token("one") == one
    assert path.stat().st_mode & 0o777 == 0o600
    reread = InstanceTokens(path)
    assert reread.token("one") == one
    assert reread.token("two") == two
    reread.keep_only(["two"])
    assert InstanceTokens(path).token("two") == two
    assert InstanceTokens(path).token("one") != one


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"version": 2, "tokens": {}}',
        '{"version": 1}',
        '{"version": 1, "tokens": {"a": 5}}',
        '{"version": 1, "tokens": []}',
    ],
)
def test_a_tokens_file_that_is_not_one_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / TOKENS_FILE
    path.write_text(content)
    with pytest.raises(TokenFileError, match=f"{path}: not a tokens file"):
        InstanceTokens(path)
    assert path.read_text() == content, "a refused file is left as it was"


def challenge(slug: str, status: int) -> registry_pb2.Challenge:
    return registry_pb2.Challenge(slug=slug, image=f"{NATIVE}:1.0.0", status=status)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_registry_is_read_again_only_after_the_stream_changed_it(
    store: Store, tmp_path: Path
) -> None:
    wanted = StreamedRegistry(store, InstanceTokens(tmp_path / TOKENS_FILE))
    await store.apply_registry(Cursor("h", 1), snapshot=[challenge("one", ACTIVE)])
    first = await wanted.wanted()
    assert (first.revision, set(first.specs)) == (1, {"one"})

    # Applied without the stream saying so: a poll pass keeps what it read, and waits.
    await store.apply_registry(Cursor("h", 2), put=challenge("two", ACTIVE))
    assert set((await wanted.wanted()).specs) == {"one"}
    await asyncio.wait_for(wanted.wait_after(first.revision, 0.05), 5)

    # The stream applied a change: read again, at once.
    wanted.changed()
    await asyncio.wait_for(wanted.wait_after(first.revision, 30), 1)
    second = await wanted.wanted()
    assert (second.revision, set(second.specs)) == (2, {"one", "two"})
    assert second.specs["two"].token == tokens_in(tmp_path)["two"]
