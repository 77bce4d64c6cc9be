"""CPU cost of one call through a shim: the shim's and the challenge's share.

One SDK challenge (``bench.challenge_farm`` with one challenge scoring 256 hotkeys,
no delay) behind one real ``platform shim``; after 20 unmeasured calls, ``--calls``
Health calls and then ``--calls`` GetWeights calls (each of which the shim precedes with
the challenge's Health, as in an epoch) are made one after the other, and
the CPU time each process used is read from /proc and divided by the number of calls.
The CPU other processes and the hypervisor took meanwhile is printed too: it slows
the measured processes down and so raises their figures.

    python -m bench.shim_calls [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from bench.common import (
    CHALLENGE_ENV,
    CpuMeter,
    command_line,
    cpu_seconds,
    machine,
    other_load_warning,
    table,
)
from platform_network.v1 import challenge_pb2, challenge_pb2_grpc
from tests.shim.support import AUTH, Process, shim

MODULE = "bench.shim_calls"
REPO = Path(__file__).resolve().parents[1]


async def run(calls: int, workdir: Path) -> tuple[list[list[object]], str]:
    farm = Process(
        "farm",
        [sys.executable, "-m", "bench.challenge_farm", "--count", "1", "--delay", "0"],
        workdir,
        env=CHALLENGE_ENV,
    )
    front: Process | None = None
    try:
        address = farm.start()["addresses"][0]
        front = shim(workdir, address, "--log-level", "warning")
        listen = front.start()["listen"]
        assert farm.proc is not None
        assert front.proc is not None
        pids = {"shim": front.proc.pid, "challenge": farm.proc.pid}
        async with grpc.aio.insecure_channel(listen) as channel:
            stub = challenge_pb2_grpc.ChallengeInternalStub(channel)
            weights = challenge_pb2.GetWeightsRequest(
                epoch=1, epoch_id="bench", netuid=1, metagraph_block=1
            )
            methods: dict[str, Callable[[], Awaitable[object]]] = {
                "Health": lambda: stub.Health(challenge_pb2.HealthRequest(), metadata=AUTH),
                "GetWeights (256 entries, health-gated)": lambda: stub.GetWeights(
                    weights, metadata=AUTH
                ),
            }
            rows: list[list[object]] = []
            # This process (the client) and its children (shim, challenge) are "own".
            meter = CpuMeter([os.getpid()])
            meter.start()
            for name, call in methods.items():
                for _ in range(20):
                    await call()
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                for _ in range(calls):
                    await call()
                used = {k: (cpu_seconds(pid) - before[k]) / calls * 1000 for k, pid in pids.items()}
                rows.append([name, f"{used['shim']:.2f}", f"{used['challenge']:.2f}"])
            _, other = meter.stop()
            return rows, other_load_warning(other, meter.steal)
    finally:
        if front is not None:
            front.stop()
        farm.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    (REPO / ".tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / ".tmp", prefix="bench-shim-") as tmp:
        rows, load = asyncio.run(run(args.calls, Path(tmp)))
    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(table(["call", "shim CPU ms/call", "challenge CPU ms/call"], rows))
    print(load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
