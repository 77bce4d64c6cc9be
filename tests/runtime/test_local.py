"""The local runtime with the real examples and real ``platform shim`` processes:
start, answer through the shim, crash and restart, replace, stop, adopt after the
owner is gone, refuse what cannot run."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from platform_common.runtime import Instance, InstanceState, RuntimeBusy, RuntimeSpec
from platform_common.runtime.local import RECORD
from tests.runtime.support import (
    ALICE,
    HTTP,
    NATIVE,
    TOKEN,
    Runtimes,
    alive,
    environ_of,
    get_weights,
    solve,
    wait_state,
    weights_refused,
)
from tests.support.waiting import eventually

pytestmark = pytest.mark.process

NATIVE_SPEC = RuntimeSpec(slug="sum-bench", image=f"{NATIVE}:1.0.0", token=TOKEN, public_port=8080)


@pytest.fixture
async def runtimes(tmp_path: Path) -> AsyncIterator[Runtimes]:
    made = Runtimes(tmp_path / "state")
    try:
        yield made
    finally:
        await made.cleanup()


async def gone(pids: list[int]) -> bool:
    return not any(alive(pid) for pid in pids)


async def test_native_challenge_answers_through_its_shim_then_stops(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    first = await runtime.ensure(NATIVE_SPEC)
    assert first.state is InstanceState.STARTING
    assert first.digest == NATIVE_SPEC.digest()
    running = await wait_state(runtimes, runtime, "sum-bench")
    assert set(running.pids) == {"challenge", "shim"}
    assert running.shim_address
    assert running.public_address
    assert running.restarts == 0

    # Miners reach the public API; the master reaches the shim with the token.
    await solve(running.public_address, ALICE, task_id=1)
    assert await get_weights(running.shim_address, TOKEN) == [(ALICE, 1.0)]
    assert await weights_refused(running.shim_address, "x" * 32) is grpc.StatusCode.UNAUTHENTICATED

    # The same spec again changes nothing.
    again = await runtime.ensure(NATIVE_SPEC)
    assert (again.state, again.pids) == (InstanceState.RUNNING, running.pids)
    assert [i.slug for i in await runtime.list()] == ["sum-bench"]

    # The record and the logs, and never the token on disk.
    directory = runtime.instance_dir("sum-bench")
    record = json.loads((directory / RECORD).read_text())
    assert record["digest"] == NATIVE_SPEC.digest()
    assert {r: p["pid"] for r, p in record["processes"].items()} == dict(running.pids)
    assert record["addresses"]["shim"] == running.shim_address
    assert oct((directory / RECORD).stat().st_mode & 0o777) == "0o600"
    for path in directory.iterdir():
        assert TOKEN not in path.read_text(errors="replace"), path.name
    assert "shim serving" in runtime.log_path("sum-bench", "shim").read_text()
    assert "sum-bench ready" in runtime.log_path("sum-bench", "challenge").read_text()

    final = await runtime.stop("sum-bench")
    assert final is not None
    assert final.state is InstanceState.STOPPED
    assert await gone(list(running.pids.values()))
    assert await runtime.status("sum-bench") is None
    assert not (directory / RECORD).exists()
    assert await runtime.stop("sum-bench") is None


async def test_http_challenge_behind_a_shim_in_http_mode(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    spec = RuntimeSpec(slug="sum-bench-http", image=f"{HTTP}:1.0.0", token=TOKEN)
    await runtime.ensure(spec)
    running = await wait_state(runtimes, runtime, "sum-bench-http")
    assert running.public_address
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{running.public_address}/leaderboard") as answer,
    ):
        assert answer.status == 200
        assert await answer.json() == []
    await solve(running.public_address, ALICE, task_id=4)
    # The challenge checks the token and the slug itself: both reached it.
    assert running.shim_address
    assert await get_weights(running.shim_address, TOKEN) == [(ALICE, 1.0)]


async def test_a_crash_of_either_process_restarts_the_pair(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    await runtime.ensure(NATIVE_SPEC)
    first = await wait_state(runtimes, runtime, "sum-bench")

    os.kill(first.pids["challenge"], signal.SIGKILL)
    second = await wait_state(runtimes, runtime, "sum-bench", unless_pids=first.pids.values())
    assert second.restarts == 1
    assert second.last_exit == "challenge killed by SIGKILL"
    assert await gone(list(first.pids.values()))  # the shim went with its challenge
    assert second.shim_address
    assert await get_weights(second.shim_address, TOKEN) == []

    os.kill(second.pids["shim"], signal.SIGKILL)
    third = await wait_state(runtimes, runtime, "sum-bench", unless_pids=second.pids.values())
    assert third.restarts == 2
    assert third.last_exit == "shim killed by SIGKILL"
    assert third.shim_address
    assert await get_weights(third.shim_address, TOKEN) == []
    # One log per process, appended across the restarts.
    starts = runtime.log_path("sum-bench", "challenge").read_text().count("platform runtime: start")
    assert starts == 3


async def test_a_challenge_that_keeps_failing_backs_off(runtimes: Runtimes) -> None:
    runtime = runtimes.new(backoff_initial=0.3, backoff_max=0.6)
    # An unknown fault makes the example exit at once.
    spec = RuntimeSpec(slug="broken", image=NATIVE, env={"CHALLENGE_FAULT": "nope"}, token=TOKEN)
    await runtime.ensure(spec)

    async def retried() -> Instance | None:
        instance = await runtime.status("broken")
        return instance if instance is not None and instance.restarts >= 2 else None

    instance = await eventually(retried, "two restarts", within=30)
    assert instance.state in (InstanceState.BACKOFF, InstanceState.STARTING)
    assert instance.last_exit.startswith("challenge exited with status 1 before it was ready")
    assert "last log line: argparse.ArgumentTypeError: unknown fault 'nope'" in instance.last_exit
    assert instance.pids == {} or instance.state is InstanceState.STARTING
    await runtime.stop("broken")


async def test_an_unknown_image_fails_with_the_reason(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    spec = RuntimeSpec(slug="mystery", image="ghcr.io/elsewhere/mystery:1", token=TOKEN)
    await runtime.ensure(spec)
    failed = await wait_state(runtimes, runtime, "mystery", InstanceState.FAILED, within=10)
    assert failed.message == (
        "image 'ghcr.io/elsewhere/mystery:1': repository 'ghcr.io/elsewhere/mystery' is not in "
        f"{runtime.images.source} (known: {HTTP}, {NATIVE})"
    )
    assert failed.pids == {}
    # Not retried for the same spec; a new spec is tried again.
    assert (await runtime.ensure(spec)).state is InstanceState.FAILED
    fixed = RuntimeSpec(slug="mystery", image=f"{HTTP}:1", token=TOKEN)
    assert (await runtime.ensure(fixed)).digest == fixed.digest()
    await wait_state(runtimes, runtime, "mystery")


async def test_a_changed_spec_replaces_the_instance_in_a_clean_environment(
    runtimes: Runtimes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner's secrets must not reach a challenge or its shim.
    monkeypatch.setenv("PLATFORM_ADMIN_TOKEN", "owner-secret-0123456789")
    runtime = runtimes.new()
    spec = RuntimeSpec(slug="sum-bench", image=NATIVE, env={"LEVEL": "1"}, token=TOKEN)
    await runtime.ensure(spec)
    first = await wait_state(runtimes, runtime, "sum-bench")

    changed = RuntimeSpec(slug="sum-bench", image=NATIVE, env={"LEVEL": "2"}, token=TOKEN)
    await runtime.ensure(changed)
    second = await wait_state(runtimes, runtime, "sum-bench", unless_pids=first.pids.values())
    assert second.digest == changed.digest() != first.digest
    assert second.restarts == 0  # a replacement is not a crash
    assert await gone(list(first.pids.values()))

    environ = environ_of(second.pids["challenge"])
    assert b"LEVEL=2" in environ
    assert f"CHALLENGE_TOKEN={TOKEN}".encode() in environ
    assert b"PLATFORM_CHALLENGE_SLUG=sum-bench" in environ
    assert f"PLATFORM_SHIM_CHALLENGE_TOKEN={TOKEN}".encode() in environ_of(second.pids["shim"])
    for pid in second.pids.values():
        assert not [e for e in environ_of(pid) if b"owner-secret" in e]


async def test_instances_outlive_their_owner_and_are_adopted(runtimes: Runtimes) -> None:
    owner = runtimes.new()
    await owner.ensure(NATIVE_SPEC)
    first = await wait_state(runtimes, owner, "sum-bench")
    await owner.close(stop_instances=False)
    assert all(alive(pid) for pid in first.pids.values())

    # The next owner adopts what still runs as wanted: same processes, no restart.
    successor = runtimes.new()
    adopted = await successor.adopt(["sum-bench"])
    assert [(i.slug, i.state, i.pids) for i in adopted] == [
        ("sum-bench", InstanceState.RUNNING, first.pids)
    ]
    again = await successor.ensure(NATIVE_SPEC)
    assert (again.state, again.pids, again.shim_address) == (
        InstanceState.RUNNING,
        first.pids,
        first.shim_address,
    )
    assert first.shim_address
    assert await get_weights(first.shim_address, TOKEN) == []

    # Adopted processes are watched too: a crash restarts the pair under the new owner.
    os.kill(first.pids["challenge"], signal.SIGKILL)
    restarted = await wait_state(runtimes, successor, "sum-bench", unless_pids=first.pids.values())
    assert restarted.restarts == 1
    assert await gone(list(first.pids.values()))
    await successor.close(stop_instances=False)

    # ensure() without adopt() still never starts a second copy...
    third = runtimes.new()
    assert (await third.ensure(NATIVE_SPEC)).pids == restarted.pids
    # ...and a changed spec (here a rotated token) replaces what was adopted.
    rotated = RuntimeSpec(slug="sum-bench", image=NATIVE_SPEC.image, token=TOKEN + "-rotated")
    await third.ensure(rotated)
    replaced = await wait_state(runtimes, third, "sum-bench", unless_pids=restarted.pids.values())
    assert replaced.digest == rotated.digest()
    assert await gone(list(restarted.pids.values()))
    assert replaced.shim_address
    assert await get_weights(replaced.shim_address, rotated.token) == []
    code = await weights_refused(replaced.shim_address, TOKEN)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    await third.close(stop_instances=False)

    # Nothing wanted any more: the orphans are stopped and their record removed.
    last = runtimes.new()
    assert await last.adopt([]) == []
    assert await gone(list(replaced.pids.values()))
    assert not (last.instance_dir("sum-bench") / RECORD).exists()
    assert await last.list() == []


async def test_one_owner_per_state_directory(runtimes: Runtimes) -> None:
    runtime = runtimes.new()
    with pytest.raises(RuntimeBusy, match="another runtime owns this state directory"):
        runtimes.new()
    await runtime.close()
    with pytest.raises(RuntimeBusy, match="closed"):
        await runtime.ensure(NATIVE_SPEC)
    runtimes.new()  # the lock went with the first owner
