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

Then, for reference, the same client against the floor of the stack: a bare
``grpc.aio`` server in its own process (no interceptor, no authentication, one
generic handler) answering the same method with the same bytes. The master's rate
as a share of that one says how much of the per-call cost is the master's own.

Exit status: 0 when the target holds; 1 when it is missed; 2 on an error.

    python -m bench.latest_weights [--seconds 10] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    CpuMeter,
    Target,
    command_line,
    fail,
    machine,
    master_pid,
    other_load_warning,
    print_targets,
    run_in_scratch,
    table,
    targets_status,
)
from platform_network.v1 import weights_pb2
from tests.support.master import ADMIN, epoch_master_process

MODULE = "bench.latest_weights"
TARGET_RPS = 3000


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


def bare_server(payload: bytes, out: Any) -> None:
    """A bare ``grpc.aio`` server answering GetLatestWeights with ``payload``; puts its port."""
    import asyncio

    async def answer(request: bytes, context: Any) -> bytes:
        return payload

    handler: Any = grpc.unary_unary_rpc_method_handler(answer)

    class Handlers(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            return handler

    async def serve() -> None:
        server = grpc.aio.server(handlers=[Handlers()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


@dataclass(frozen=True)
class Measured:
    result: ClientResult
    server_cpu: float  # % of one CPU over the counted window
    other: float  # % of one CPU used by other processes (the client excluded)
    steal: float


def measure(address: str, server_pid: int, args: argparse.Namespace) -> Measured:
    """Drive ``address`` from a client process; the server's CPU over the counted window."""
    spawn = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[ClientResult] = spawn.Queue()
    counting = spawn.Event()
    client = spawn.Process(
        target=client_process, args=(address, args.seconds, args.concurrency, counting, queue)
    )
    client.start()
    try:
        if not counting.wait(60):
            raise RuntimeError("the client did not start counting")
        meter = CpuMeter([server_pid])
        meter.start()
        result = queue.get(timeout=args.seconds + 60)
        _, other = meter.stop()
        client.join(10)
    finally:
        if client.is_alive():
            client.kill()
    # The client's own CPU counts as "other" for the meter (it watches the server).
    other = max(0.0, other - result.cpu_seconds / args.seconds * 100)
    return Measured(result, meter.per_root[0], other, meter.steal)


def wait_sealed(address: str) -> bytes:
    """The sealed vector's bytes, once the master has one."""
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[weights_pb2.GetLatestWeightsRequest, bytes] = (
            channel.unary_unary(
                "/platform_network.v1.Weights/GetLatestWeights",
                request_serializer=weights_pb2.GetLatestWeightsRequest.SerializeToString,
            )
        )
        while True:
            try:
                return call(weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def measure_floor(payload: bytes, args: argparse.Namespace) -> Measured:
    spawn = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = spawn.Queue()
    server = spawn.Process(target=bare_server, args=(payload, ports), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        assert server.pid is not None
        return measure(f"127.0.0.1:{port}", server.pid, args)
    finally:
        server.kill()
        server.join(10)


def run(args: argparse.Namespace, workdir: Path) -> int:
    master = epoch_master_process(
        workdir, "--log-level", "warning", neurons=256, hotkey="//platform-bench/master"
    )
    try:
        address = master.start()
        payload = wait_sealed(address)
        served = measure(address, master_pid(master), args)
    finally:
        master.stop()
    floor = measure_floor(payload, args) if args.floor else None

    def row(name: str, measured: Measured) -> list[object]:
        answers = max(measured.result.answers, 1)
        return [
            name,
            f"{measured.result.answers / args.seconds:,.0f}",
            measured.result.answers,
            f"{measured.server_cpu:.0f}",
            f"{measured.server_cpu / 100 * args.seconds / answers * 1e6:.0f}",
            f"{measured.result.cpu_seconds / answers * 1e6:.0f}",
        ]

    rps = served.result.answers / args.seconds
    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(f"{args.seconds:g} s counted after a 1 s warm-up, {args.concurrency} calls in flight")
    rows = [row("master", served)]
    if floor is not None:
        rows.append(row("bare grpc.aio server, same bytes", floor))
    print(
        table(
            [
                "server",
                "answers/s",
                "answers",
                "server CPU %",
                "server CPU us/answer",
                "client CPU us/answer",
            ],
            rows,
        )
    )
    if floor is not None and floor.result.answers:
        print(
            f"master: {served.result.answers / floor.result.answers:.0%} of the bare server's rate"
        )
    runs = [served] if floor is None else [served, floor]
    print(other_load_warning(max(m.other for m in runs), max(m.steal for m in runs)))
    targets: list[Target] = [(f">= {TARGET_RPS:,} answers/s", f"{rps:,.0f}", rps >= TARGET_RPS)]
    print_targets(targets)
    mismatches = served.result.mismatches + (floor.result.mismatches if floor else 0)
    if mismatches:
        fail(f"{mismatches} answers were not the sealed vector")
        return 2
    return targets_status(targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the reference run against a bare grpc.aio server",
    )
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    return run_in_scratch("latest", args.timeout, lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
