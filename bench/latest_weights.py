"""GetLatestWeights throughput: a real master process, a client in another process.

The master (``platform master`` on SQLite, the local simulated subnet, 256 neurons)
seals one epoch at start-up; then a client process keeps ``--concurrency`` calls in
flight on one channel for ``--seconds`` seconds (after a 1 s warm-up) and counts the
answers. The target is >= 3,000 answers per second; every answer is checked to be the
sealed vector.

Exit status: 0 when the target holds; 1 when it is missed; 2 on an error.

    python -m bench.latest_weights [--seconds 10] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import grpc

from bench.common import (
    BenchTimeout,
    CpuMeter,
    command_line,
    fail,
    hard_timeout,
    machine,
    master_pid,
    table,
)
from platform_network.v1 import weights_pb2, weights_pb2_grpc
from tests.support.master import ADMIN, epoch_master_process

MODULE = "bench.latest_weights"
TARGET_RPS = 3000
REPO = Path(__file__).resolve().parents[1]


def _sync_client(address: str, seconds: float, concurrency: int) -> tuple[int, int]:
    """Calls kept in flight with the C-core's futures: far less Python per call than
    grpc.aio, so the client does not cap the figure before the server does."""
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[weights_pb2.GetLatestWeightsRequest, bytes] = (
            channel.unary_unary(
                "/platform_network.v1.Weights/GetLatestWeights",
                request_serializer=weights_pb2.GetLatestWeightsRequest.SerializeToString,
            )
        )
        request = weights_pb2.GetLatestWeightsRequest()
        expected = call(request, metadata=ADMIN)
        lock = threading.Lock()
        done = threading.Event()
        state = {"count": 0, "mismatches": 0, "counting": False}
        stop_at = time.monotonic() + 1.0 + seconds
        in_flight = [concurrency]

        def issue() -> None:
            future = call.future(request, metadata=ADMIN)
            future.add_done_callback(finished)

        def finished(future: grpc.Future) -> None:  # type: ignore[type-arg]
            answer = future.result()
            with lock:
                if state["counting"]:
                    state["count"] += 1
                    if answer != expected:
                        state["mismatches"] += 1
            if time.monotonic() < stop_at:
                issue()
            else:
                with lock:
                    in_flight[0] -= 1
                    if in_flight[0] == 0:
                        done.set()

        for _ in range(concurrency):
            issue()
        time.sleep(1.0)
        with lock:
            state["counting"] = True
        done.wait(seconds + 30)
        return state["count"], state["mismatches"]


def client_process(address: str, seconds: float, concurrency: int, out: object) -> None:
    out.put(_sync_client(address, seconds, concurrency))  # type: ignore[attr-defined]


def run(args: argparse.Namespace, workdir: Path) -> int:
    master = epoch_master_process(
        workdir, "--log-level", "warning", neurons=256, hotkey="//platform-bench/master"
    )
    try:
        address = master.start()
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(address) as channel:
            stub = weights_pb2_grpc.WeightsStub(channel)
            while True:
                try:
                    stub.GetLatestWeights(weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        meter = CpuMeter([master_pid(master)])
        meter.start()
        spawn = multiprocessing.get_context("spawn")
        queue: multiprocessing.Queue[tuple[int, int]] = spawn.Queue()
        client = spawn.Process(
            target=client_process, args=(address, args.seconds, args.concurrency, queue)
        )
        client.start()
        count, mismatches = queue.get(timeout=args.seconds + 60)
        client.join(10)
        meter.stop()
        master_cpu = meter.per_root[0]
    finally:
        master.stop()
    rps = count / args.seconds
    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(
        table(
            ["answers/s", "answers", "seconds", "concurrency", "master CPU %", "target"],
            [
                [
                    f"{rps:,.0f}",
                    count,
                    args.seconds,
                    args.concurrency,
                    f"{master_cpu:.0f}",
                    f">= {TARGET_RPS:,}",
                ]
            ],
        )
    )
    if mismatches:
        fail(f"{mismatches} answers were not the sealed vector")
        return 2
    if rps < TARGET_RPS:
        fail("the target was missed")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    (REPO / ".tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / ".tmp", prefix="bench-latest-") as tmp:
        try:
            with hard_timeout(args.timeout):
                return run(args, Path(tmp))
        except BenchTimeout as exc:
            fail(str(exc))
            return 2
        except Exception:
            traceback.print_exc()
            return 2


if __name__ == "__main__":
    sys.exit(main())
