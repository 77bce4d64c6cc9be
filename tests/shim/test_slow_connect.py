"""A challenge whose connection takes a while to come up is still reached.

Right after a challenge (re)starts, or while an epoch keeps a small machine busy, the
challenge can take longer than usual to finish gRPC's connection handshake. The shim must
wait for it within the call's deadline instead of giving up on the connection early and
failing the epoch's call. A relay in front of the challenge holds every new connection for
a while before passing bytes through, so the HTTP/2 handshake completes only after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from bittensor.sp_core import Keypair

from challenge_shim.sdk import Challenge, WeightsRequest
from tests.shim.support import AUTH, TOKEN, shim, stub, weights_request

pytestmark = pytest.mark.process

ALICE = Keypair.create_from_uri("//Alice").ss58_address
# Longer than a connection attempt may take under load, far shorter than the call deadline.
HANDSHAKE_DELAY = 0.6


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def slow_relay(target: str, delay: float) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP relay to ``target`` that waits ``delay`` s before relaying each connection."""
    host, port = target.rsplit(":", 1)
    accepted: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await asyncio.sleep(delay)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_slow_connection_handshake_is_waited_for(tmp_path: Path) -> None:
    challenge = Challenge(name="slow-start", version="0.0.1")

    @challenge.weights
    async def weights(request: WeightsRequest) -> dict[str, float]:
        return {ALICE: 1.0}

    running = await challenge.start("127.0.0.1:0", token=TOKEN, grace=0.5)
    try:
        async with slow_relay(running.address, HANDSHAKE_DELAY) as (address, accepted):
            front = shim(tmp_path, address)
            try:
                await asyncio.to_thread(front.start)
                async with grpc.aio.insecure_channel(front.ready["listen"]) as channel:
                    answer = await stub(channel).GetWeights(
                        weights_request(), metadata=AUTH, timeout=10
                    )
            finally:
                front.stop()
        assert [(e.hotkey, e.score) for e in answer.entries] == [(ALICE, 1.0)]
        # One connection, held for the whole delay, carried the calls: no attempt was
        # abandoned and retried.
        assert len(accepted) == 1
    finally:
        await running.stop()
