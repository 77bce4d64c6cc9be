"""The orchestrator over a real registry (store and feed on SQLite) and the local runtime:
status changes and token rotations in the registry start, restart and stop real
challenges, and the placement tells the epochs engine and the edge where they are."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from master.db import migrate
from master.db.engine import create_engine
from master.orchestrator import Orchestrator, RuntimePlacement
from master.registry.feed import RegistryFeed
from master.registry.rules import Policy, Routes, Spec, Status
from master.registry.store import RegistryStore
from master.registry.tokens import TokenIssuer
from master.weights.endpoints import PublicDirectory, ShimDirectory
from platform_common.runtime import Instance, InstanceState, Runtime, RuntimeSpec
from tests.runtime.support import (
    ALICE,
    NATIVE,
    WITHIN,
    Runtimes,
    alive,
    get_weights,
    solve,
    weights_refused,
)
from tests.support.waiting import eventually

pytestmark = pytest.mark.process

POLL = 0.2


class Stack:
    """A registry (store and feed) and an orchestrator driving a local runtime, as the
    master composes them."""

    def __init__(self, store: RegistryStore, feed: RegistryFeed, runtimes: Runtimes) -> None:
        self.store = store
        self.feed = feed
        self.runtimes = runtimes
        self.runtime = runtimes.new()
        self.orchestrator = Orchestrator(feed, self.runtime, store.tokens_of, poll=POLL)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.orchestrator.start()
        self.task = asyncio.create_task(self.orchestrator.run_forever())

    async def stop(self, *, stop_instances: bool) -> None:
        """What the master does at shutdown."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.runtime.close(stop_instances=stop_instances)

    async def placed(self, slug: str, *, after: Instance | None = None) -> tuple[str, str]:
        """(shim, public) addresses of ``slug`` once RUNNING and placed; with ``after``,
        only once it runs other processes than that instance."""
        old = set(after.pids.values()) if after is not None else set()

        async def check() -> tuple[str, str] | None:
            instance = await self.runtime.status(slug)
            self.runtimes.saw(instance)
            if instance is None or old & set(instance.pids.values()):
                return None
            shim = (await self.orchestrator.placement.addresses()).get(slug)
            public = (await self.orchestrator.placement.public_addresses()).get(slug)
            return (shim, public) if shim and public else None

        return await eventually(check, f"{slug} placed", WITHIN)

    async def instance(self, slug: str) -> Instance:
        found = await self.runtime.status(slug)
        assert found is not None
        self.runtimes.saw(found)
        return found


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[RegistryStore, RegistryFeed]]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await migrate.upgrade(engine)
    store = RegistryStore(engine, Policy(), TokenIssuer(secrets.token_bytes(32)))
    feed = RegistryFeed(store, poll_interval=POLL)
    await feed.start()
    try:
        yield store, feed
    finally:
        await feed.close()
        await engine.dispose()


@pytest.fixture
async def runtimes(tmp_path: Path) -> AsyncIterator[Runtimes]:
    made = Runtimes(tmp_path / "runtime")
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def stack(
    registry: tuple[RegistryStore, RegistryFeed], runtimes: Runtimes
) -> AsyncIterator[Stack]:
    made = Stack(*registry, runtimes)
    await made.start()
    try:
        yield made
    finally:
        await made.stop(stop_instances=True)


async def test_registry_status_and_token_drive_the_runtime(stack: Stack) -> None:
    store, feed = stack.store, stack.feed
    spec = Spec(
        slug="sum-bench",
        name="Sum Bench",
        image=f"{NATIVE}:1.0.0",
        emission_share=0.5,
        routes=Routes(public_port=8080),
    )
    _, token = await store.create(spec)
    await feed.sync()
    await asyncio.sleep(POLL * 3)  # a DRAFT challenge is not run
    assert await stack.runtime.list() == []

    # ACTIVE: started, placed for the epochs engine and the edge, answers with its token.
    await store.set_status("sum-bench", Status.ACTIVE)
    await feed.sync()
    shim, public = await stack.placed("sum-bench")
    await solve(public, ALICE, task_id=3)
    assert await get_weights(shim, token) == [(ALICE, 1.0)]
    first = await stack.instance("sum-bench")
    assert first.state is InstanceState.RUNNING

    # A rotated token replaces the instance: the shim takes only the new one.
    _, rotated = await store.rotate_token("sum-bench")
    await feed.sync()
    new_shim, _ = await stack.placed("sum-bench", after=first)
    second = await stack.instance("sum-bench")
    assert second.digest != first.digest
    assert not set(second.pids.values()) & set(first.pids.values())
    assert not any(alive(pid) for pid in first.pids.values())
    assert await get_weights(new_shim, rotated) == []
    assert await weights_refused(new_shim, token) is grpc.StatusCode.UNAUTHENTICATED

    # A crash is noticed and repaired without any registry change.
    os.kill(second.pids["challenge"], signal.SIGKILL)
    await stack.placed("sum-bench", after=second)
    third = await stack.instance("sum-bench")
    assert third.restarts == 1
    assert await get_weights(new_shim, rotated) == []  # the same address after a restart

    # INACTIVE: stopped, gone from the placement.
    await store.set_status("sum-bench", Status.INACTIVE)
    await feed.sync()

    async def stopped() -> bool:
        return await stack.runtime.status("sum-bench") is None

    await eventually(stopped, "sum-bench stopped", WITHIN)
    assert not any(alive(pid) for pid in third.pids.values())
    assert await stack.orchestrator.placement.addresses() == {}
    assert await stack.orchestrator.placement.public_addresses() == {}


async def test_an_unrunnable_challenge_is_failed_and_others_run(stack: Stack) -> None:
    store, feed = stack.store, stack.feed
    for slug, image in (("mystery", "ghcr.io/elsewhere/mystery:1"), ("sum-bench", NATIVE)):
        await store.create(Spec(slug=slug, name=slug, image=image, emission_share=0.2))
        await store.set_status(slug, Status.ACTIVE)
    await feed.sync()
    await stack.placed("sum-bench")

    async def failed() -> Instance | None:
        instance = await stack.runtime.status("mystery")
        return instance if instance and instance.state is InstanceState.FAILED else None

    assert "is not in" in (await eventually(failed, "mystery FAILED", WITHIN)).message
    assert set(await stack.orchestrator.placement.addresses()) == {"sum-bench"}

    # Deleted from the registry: its FAILED instance is forgotten too.
    await store.set_status("mystery", Status.DISABLED)
    await store.delete("mystery")
    await feed.sync()

    async def forgotten() -> bool:
        return [i.slug for i in await stack.runtime.list()] == ["sum-bench"]

    await eventually(forgotten, "mystery forgotten", WITHIN)


async def test_a_master_restart_adopts_what_runs(
    registry: tuple[RegistryStore, RegistryFeed], runtimes: Runtimes
) -> None:
    store, feed = registry
    for slug in ("sum-bench", "leftover"):
        await store.create(Spec(slug=slug, name=slug, image=NATIVE, emission_share=0.3))
        await store.set_status(slug, Status.ACTIVE)
    await feed.sync()
    before = Stack(store, feed, runtimes)
    await before.start()
    await before.placed("sum-bench")
    await before.placed("leftover")
    kept = await before.instance("sum-bench")
    dropped = await before.instance("leftover")
    await before.stop(stop_instances=False)  # the master exits, keeping its challenges

    # While it is down, one challenge is deactivated.
    await store.set_status("leftover", Status.INACTIVE)
    await feed.sync()
    after = Stack(store, feed, runtimes)
    try:
        await after.start()
        # Adopted at start-up with the same processes: no restart, no new token needed.
        adopted = await after.instance("sum-bench")
        assert (adopted.state, adopted.pids) == (InstanceState.RUNNING, kept.pids)
        assert adopted.digest == kept.digest
        assert set(await after.orchestrator.placement.addresses()) == {"sum-bench"}
        # The other one is an orphan now: stopped before start() returned.
        assert await after.runtime.status("leftover") is None
        assert not any(alive(pid) for pid in dropped.pids.values())
        await asyncio.sleep(POLL * 3)  # a few passes later, still the same processes
        assert (await after.instance("sum-bench")).pids == kept.pids
    finally:
        await after.stop(stop_instances=True)
    assert not any(alive(pid) for pid in kept.pids.values())


def test_the_placement_serves_the_epochs_engine_and_the_edge() -> None:
    # Statically checked (mypy): the placement is both directories the master reads.
    placement = RuntimePlacement(runtime=None)  # type: ignore[arg-type]
    shims: ShimDirectory = placement
    publics: PublicDirectory = placement
    assert callable(shims.addresses)
    assert callable(publics.public_addresses)


class RecordingRuntime:
    """A runtime that runs nothing: it remembers what it was asked."""

    def __init__(self) -> None:
        self.specs: dict[str, RuntimeSpec] = {}
        self.stopped: list[str] = []

    async def ensure(self, spec: RuntimeSpec) -> Instance:
        self.specs[spec.slug] = spec
        return Instance(spec.slug, spec.digest(), InstanceState.RUNNING)

    async def stop(self, slug: str) -> Instance | None:
        self.stopped.append(slug)
        spec = self.specs.pop(slug, None)
        return None if spec is None else Instance(slug, spec.digest(), InstanceState.STOPPED)

    async def status(self, slug: str) -> Instance | None:
        spec = self.specs.get(slug)
        return None if spec is None else Instance(slug, spec.digest(), InstanceState.RUNNING)

    async def list(self) -> list[Instance]:
        return [i for slug in sorted(self.specs) if (i := await self.status(slug))]

    async def adopt(self, desired: Iterable[str]) -> builtins.list[Instance]:
        return []

    async def close(self, *, stop_instances: bool = True) -> None:
        pass


async def test_tokens_are_read_once_per_issue_and_a_missing_one_is_reported_once(
    registry: tuple[RegistryStore, RegistryFeed], caplog: pytest.LogCaptureFixture
) -> None:
    store, feed = registry
    env = {"LEVEL": "3"}
    await store.create(
        Spec(
            slug="alpha",
            name="alpha",
            image=NATIVE,
            emission_share=0.2,
            env=env,
            routes=Routes(public_port=9000),
        )
    )
    await store.create(Spec(slug="beta", name="beta", image=NATIVE, emission_share=0.2))
    for slug in ("alpha", "beta"):
        await store.set_status(slug, Status.ACTIVE)
    await feed.sync()
    asked: list[list[str]] = []

    async def tokens(slugs: Sequence[str]) -> Mapping[str, str]:
        asked.append(sorted(slugs))
        known = await store.tokens_of(slugs)
        return {slug: token for slug, token in known.items() if slug != "beta"}

    runtime = RecordingRuntime()
    checked: Runtime = runtime  # the fake keeps to the interface (mypy)
    assert checked is runtime
    orchestrator = Orchestrator(feed, runtime, tokens, poll=POLL)
    await orchestrator.start()
    for _ in range(3):
        await orchestrator.reconcile()
    assert asked == [["alpha", "beta"]]
    assert list(runtime.specs) == ["alpha"]  # beta has no token the master can present
    alpha = runtime.specs["alpha"]
    assert (alpha.image, dict(alpha.env), alpha.public_port) == (NATIVE, env, 9000)
    assert alpha.token == (await store.tokens_of(["alpha"]))["alpha"]
    complaints = [r for r in caplog.records if r.getMessage() == "challenge not run"]
    assert [getattr(r, "slug", None) for r in complaints] == ["beta"]

    _, rotated = await store.rotate_token("alpha")
    await feed.sync()
    await orchestrator.reconcile()
    assert asked[1:] == [["alpha"]]
    assert runtime.specs["alpha"].token == rotated

    await store.set_status("alpha", Status.INACTIVE)
    await feed.sync()
    await orchestrator.reconcile()
    assert runtime.stopped == ["alpha"]
    assert runtime.specs == {}
