"""GetLatestWeights throughput: a real master process, a client in another process.

The master (``platform master`` on SQLite, the local simulated subnet, 256 neurons)
seals one epoch at start-up; then a client process keeps ``--concurrency`` calls in
flight on one channel for ``--seconds`` seconds (after a 1 s warm-up) and counts the
answers. The target is >= 3,000 answers per second; every answer is checked to be the
sealed vector.

Besides the rate, it prints the CPU time the master (all its threads) and the client
process used per answer over the counted window: robust where the rate is not (on two
shared CPUs the two processes compete, and hypervisor steal slows both), and the
share of the machine other processes and the hypervisor took.

Exit status: 0 when the target holds; 1 when it is missed; 2 on an error.

    python -m bench.latest_weights [--seconds 10] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    BenchTimeout,
    CpuMeter,
    command_line,
    fail,
    hard_timeout,
    machine,
    master_pid,
    other_load_warning,
    table,
)
from platform_network.v1 import weights_pb2, weights_pb2_grpc
from tests.support.master import ADMIN, epoch_master_process

MODULE = "bench.latest_weights"
TARGET_RPS = 3000
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ClientResult:
    answers: int  # answers that arrived within the counted window
    mismatches: int  # answers that were not the sealed vector
    cpu_seconds: float  # CPU time of the client process (all threads) over the window


def _sync_client(
    address: str, seconds: float, concurrency: int, counting: Any = None
) -> ClientResult:
    """Calls kept in flight with the C-core's futures: far less Python per call than
    grpc.aio, so the client does not cap the figure before the server does.

    Answers are counted for ``seconds`` after a 1 s warm-up; ``counting`` (an event)
    is set when the count starts, for the caller to measure the master over the
    same window."""
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
        state = {"count": 0, "mismatches": 0}
        window = [math.inf, time.monotonic() + 1.0 + seconds]  # counted from, until
        in_flight = [concurrency]

        def issue() -> None:
            future = call.future(request, metadata=ADMIN)
            future.add_done_callback(finished)

        def finished(future: grpc.Future) -> None:  # type: ignore[type-arg]
            answer = future.result()
            now = time.monotonic()
            with lock:
                if window[0] <= now < window[1]:
                    state["count"] += 1
                    if answer != expected:
                        state["mismatches"] += 1
            if now < window[1]:
                issue()
            else:
                with lock:
                    in_flight[0] -= 1
                    if in_flight[0] == 0:
                        done.set()

        for _ in range(concurrency):
            issue()
        time.sleep(1.0)
        cpu_start = time.process_time()
        with lock:
            window[0] = time.monotonic()
        if counting is not None:
            counting.set()
        time.sleep(max(window[1] - time.monotonic(), 0.0))
        cpu = time.process_time() - cpu_start
        done.wait(seconds + 30)
        return ClientResult(state["count"], state["mismatches"], cpu)


def client_process(address: str, seconds: float, concurrency: int, counting: Any, out: Any) -> None:
    out.put(_sync_client(address, seconds, concurrency, counting))


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
        spawn = multiprocessing.get_context("spawn")
        queue: multiprocessing.Queue[ClientResult] = spawn.Queue()
        counting = spawn.Event()
        client = spawn.Process(
            target=client_process,
            args=(address, args.seconds, args.concurrency, counting, queue),
        )
        client.start()
        if not counting.wait(60):
            raise RuntimeError("the client did not start counting")
        meter = CpuMeter([master_pid(master)])
        meter.start()
        result = queue.get(timeout=args.seconds + 60)
        _, other = meter.stop()
        client.join(10)
        master_cpu = meter.per_root[0]
    finally:
        master.stop()
    rps = result.answers / args.seconds
    answers = max(result.answers, 1)
    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(
        table(
            [
                "answers/s",
                "answers",
                "seconds",
                "concurrency",
                "master CPU %",
                "master CPU us/answer",
                "client CPU us/answer",
                "target",
            ],
            [
                [
                    f"{rps:,.0f}",
                    result.answers,
                    args.seconds,
                    args.concurrency,
                    f"{master_cpu:.0f}",
                    f"{master_cpu / 100 * args.seconds / answers * 1e6:.0f}",
                    f"{result.cpu_seconds / answers * 1e6:.0f}",
                    f">= {TARGET_RPS:,}",
                ]
            ],
        )
    )
    # The client's own CPU counts as "other" for the meter (it watches the master).
    print(
        other_load_warning(max(0.0, other - result.cpu_seconds / args.seconds * 100), meter.steal)
    )
    if result.mismatches:
        fail(f"{result.mismatches} answers were not the sealed vector")
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
