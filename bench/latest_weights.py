"""GetLatestWeights throughput: real master processes, a client in another process.

The master (``platform master`` on SQLite, the local simulated subnet, 256 neurons)
seals one epoch at start-up; then a client process keeps ``--concurrency`` calls in
flight on one channel for ``--seconds`` seconds (after a 1 s warm-up) and counts the
answers. Every answer is checked to be the sealed vector.

Then ``--replicas`` master processes (2 by default) serve the same port, the way
docs/operators.md describes for one host: one PostgreSQL database, ``--reuse-port``,
the first sealing the epoch and the others serving it. The client is ``h2load``
(nghttp2's C load generator: ``--replicas`` x 4 connections, 16 calls in flight on
each), since one Python process cannot drive more than about 2,500 calls a second
here. ``h2load`` cannot read gRPC answers, so they are checked otherwise: before the
run, calls on new connections to the port must each get the sealed vector, and after
it, the masters' own metrics must count no GetLatestWeights call that did not end OK,
and at least as many OK ones as ``h2load`` counted. The target is >= 3,000 answers per
second with the master processes on this machine.

Besides the rate, it prints the CPU time the masters (all their threads) and the
client used per answer over the counted window: robust where the rate is not (on two
shared CPUs the processes compete, and hypervisor steal slows all of them), and the
share of the machine other processes and the hypervisor took.

Then, for reference, the Python client against the floor of the stack: a bare
``grpc.aio`` server in its own process (no interceptor, no authentication, one
generic handler) answering the same method with the same bytes. The master's rate
as a share of that one says how much of the per-call cost is the master's own.

Needs ``h2load`` for the replicas (Debian: ``apt-get install -y nghttp2-client``;
``--replicas 0`` skips that run; ``--replicas 1`` drives one master with it).

Exit status: 0 when the target holds; 1 when it is missed; 2 on an error.

    python -m bench.latest_weights [--seconds 10] [--concurrency 64] [--replicas 2]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import re
import resource
import shutil
import subprocess
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
    database,
    fail,
    machine,
    master_pid,
    other_load_warning,
    print_targets,
    run_in_scratch,
    table,
    targets_status,
)
from platform_common.ports import free_port
from platform_network.v1 import weights_pb2
from tests.support import metrics
from tests.support.master import ADMIN, ADMIN_TOKEN, MasterProcess, epoch_master_process

MODULE = "bench.latest_weights"
TARGET_RPS = 3000
METHOD = "/platform_network.v1.Weights/GetLatestWeights"
H2LOAD_INSTALL = "apt-get install -y nghttp2-client"
H2LOAD_CONNECTIONS_PER_MASTER = 4
H2LOAD_STREAMS = 16  # calls in flight on each h2load connection
MASTER_HOTKEY = "//platform-bench/master"


@dataclass(frozen=True)
class ClientResult:
    answers: int  # answers that arrived within the counted window
    mismatches: int  # answers that were not the sealed vector
    cpu_seconds: float  # CPU time of the client process (all threads) over the window


def latest_weights_call(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[weights_pb2.GetLatestWeightsRequest, bytes]:
    """GetLatestWeights on ``channel``, its answer left as the bytes on the wire."""
    return channel.unary_unary(
        METHOD, request_serializer=weights_pb2.GetLatestWeightsRequest.SerializeToString
    )


def _sync_client(
    address: str, seconds: float, concurrency: int, counting: Any = None
) -> ClientResult:
    """Calls kept in flight with the C-core's futures: far less Python per call than
    grpc.aio, so the client does not cap the figure before the server does.

    Answers are counted for ``seconds`` after a 1 s warm-up; ``counting`` (an event)
    is set when the count starts, for the caller to measure the master over the
    same window."""
    with grpc.insecure_channel(address) as channel:
        call = latest_weights_call(channel)
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
        call = latest_weights_call(channel)
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


# -- several masters sharing the port, driven by h2load ------------------------------------


@dataclass(frozen=True)
class SharedPort:
    answers: int  # answers h2load counted within its window
    masters_cpu: float  # % of one CPU used by all the masters over the run
    client_cpu: float  # % of one CPU h2load used over the run
    other: float
    steal: float
    ok_by_master: list[int]  # GetLatestWeights calls each master answered OK (its metrics)


def grpc_frame(message: bytes) -> bytes:
    """``message`` as one gRPC length-prefixed message (not compressed)."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def answered(metrics_port: int) -> dict[str, int]:
    """GetLatestWeights calls a master answered, by status code (its /metrics)."""
    counts: dict[str, int] = {}
    for labels, value in metrics.samples(metrics_port, "platform_grpc_requests_total"):
        if labels["method"] == METHOD:
            counts[labels["code"]] = counts.get(labels["code"], 0) + int(value)
    return counts


def check_answers_on_new_connections(address: str, payload: bytes, connections: int) -> None:
    """One call on each of ``connections`` new connections (spread over the masters by
    the kernel) must get the sealed vector."""
    for _ in range(connections):
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        with grpc.insecure_channel(address, options=options) as channel:
            call = latest_weights_call(channel)
            if call(weights_pb2.GetLatestWeightsRequest(), metadata=ADMIN) != payload:
                raise RuntimeError("a master sharing the port did not answer the sealed vector")


H2LOAD_COUNTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def drive_with_h2load(
    h2load: str, address: str, args: argparse.Namespace, workdir: Path, roots: list[int]
) -> tuple[int, float, float, CpuMeter]:
    """h2load's counted answers; its CPU and that of processes outside ``roots`` (each
    in % of one CPU); the meter of ``roots``."""
    body = workdir / "request.bin"
    body.write_bytes(grpc_frame(weights_pb2.GetLatestWeightsRequest().SerializeToString()))
    command = [
        h2load,
        "--duration",
        f"{args.seconds:g}",
        "--warm-up-time",
        "1",
        "--clients",
        str(H2LOAD_CONNECTIONS_PER_MASTER * args.replicas),
        "--max-concurrent-streams",
        str(H2LOAD_STREAMS),
        "--data",
        str(body),
        "--header",
        "content-type: application/grpc",
        "--header",
        "te: trailers",
        "--header",
        f"authorization: Bearer {ADMIN_TOKEN}",
        f"http://{address}{METHOD}",
    ]
    meter = CpuMeter(roots)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    meter.start()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=args.seconds + 60, check=False
    )
    _, other = meter.stop()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    counts = H2LOAD_COUNTS.search(done.stdout)
    if done.returncode != 0 or counts is None:
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    _, _, _, succeeded, failed, errored, timed_out = (int(v) for v in counts.groups())
    if failed or errored or timed_out:
        raise RuntimeError(
            f"h2load: {failed} failed, {errored} errored, {timed_out} timed out\n{done.stdout}"
        )
    client_cpu = client / wall * 100
    return succeeded, client_cpu, max(0.0, other - client_cpu), meter


def measure_shared_port(args: argparse.Namespace, workdir: Path, h2load: str) -> SharedPort:
    with database("postgresql", workdir) as db:
        ports = [free_port() for _ in range(args.replicas)]
        first = epoch_master_process(
            workdir,
            "--log-level",
            "warning",
            "--reuse-port",
            "--metrics-listen",
            f"127.0.0.1:{ports[0]}",
            neurons=256,
            hotkey=MASTER_HOTKEY,
            database_url=db.url,
        )
        masters = [first]
        try:
            address = first.start()
            payload = wait_sealed(address)
            for i, port in enumerate(ports[1:], start=1):
                # The same settings, but sealing nothing: it serves what the first seals.
                replica = MasterProcess(
                    workdir / f"replica-{i}",
                    db.url,
                    *first.extra,
                    "--metrics-listen",
                    f"127.0.0.1:{port}",
                    "--no-epochs",
                    env=first.env,
                )
                masters.append(replica)
                replica.start(address)
            check_answers_on_new_connections(address, payload, 8 * args.replicas)
            roots = [master_pid(m) for m in masters]
            if db.server_pid is not None:
                roots.append(db.server_pid)
            before = [answered(port) for port in ports]
            answers, client_cpu, other, meter = drive_with_h2load(
                h2load, address, args, workdir, roots
            )
            counts = [
                {code: n - earlier.get(code, 0) for code, n in answered(port).items()}
                for port, earlier in zip(ports, before, strict=True)
            ]
        finally:
            for master in masters:
                master.stop()
    not_ok = {code: n for c in counts for code, n in c.items() if code != "OK" and n}
    ok = [c.get("OK", 0) for c in counts]
    if not_ok:
        raise RuntimeError(f"GetLatestWeights calls that did not end OK: {not_ok}")
    if sum(ok) < answers:
        raise RuntimeError(f"h2load counted {answers} answers, the masters {sum(ok)} OK ones")
    masters_cpu = sum(meter.per_root[: len(masters)])
    return SharedPort(answers, masters_cpu, client_cpu, other, meter.steal, ok)


def run(args: argparse.Namespace, workdir: Path) -> int:
    h2load = shutil.which("h2load") if args.replicas > 0 else ""
    if h2load is None:
        fail(f"h2load is missing; install it with: {H2LOAD_INSTALL} (or pass --replicas 0)")
        return 2
    master = epoch_master_process(
        workdir / "single", "--log-level", "warning", neurons=256, hotkey=MASTER_HOTKEY
    )
    try:
        address = master.start()
        payload = wait_sealed(address)
        served = measure(address, master_pid(master), args)
    finally:
        master.stop()
    shared = measure_shared_port(args, workdir / "shared", h2load) if h2load else None
    floor = measure_floor(payload, args) if args.floor else None

    def row(
        name: str, answers: int, server_cpu: float, client_cpu_seconds: float, steal: float
    ) -> list[object]:
        per_answer = 1e6 / max(answers, 1)
        return [
            name,
            f"{answers / args.seconds:,.0f}",
            answers,
            f"{server_cpu:.0f}",
            f"{server_cpu / 100 * args.seconds * per_answer:.0f}",
            f"{client_cpu_seconds * per_answer:.0f}",
            f"{steal:.0f}",
        ]

    def python_row(name: str, measured: Measured) -> list[object]:
        result = measured.result
        return row(name, result.answers, measured.server_cpu, result.cpu_seconds, measured.steal)

    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(
        f"{args.seconds:g} s counted after a 1 s warm-up; Python client: {args.concurrency} "
        f"calls in flight on one connection"
        + (
            f"; h2load: {H2LOAD_CONNECTIONS_PER_MASTER * args.replicas} connections x "
            f"{H2LOAD_STREAMS} calls in flight"
            if shared
            else ""
        )
    )
    rows = [python_row("1 master, Python client", served)]
    if shared is not None:
        name = (
            f"{args.replicas} masters sharing the port, h2load"
            if args.replicas > 1
            else "1 master, h2load"
        )
        client_seconds = shared.client_cpu / 100 * args.seconds
        rows.append(row(name, shared.answers, shared.masters_cpu, client_seconds, shared.steal))
    if floor is not None:
        rows.append(python_row("bare grpc.aio server, same bytes, Python client", floor))
    print(
        table(
            [
                "server, client",
                "answers/s",
                "answers",
                "server CPU %",
                "server CPU us/answer",
                "client CPU us/answer",
                "steal %",
            ],
            rows,
        )
    )
    if shared is not None:
        split = " / ".join(f"{n:,}" for n in shared.ok_by_master)
        print(
            f"answered OK by each master during the run (their metrics, warm-up included): {split}"
        )
    if floor is not None and floor.result.answers:
        print(
            f"1 master: {served.result.answers / floor.result.answers:.0%} of the bare "
            "server's rate with the same client"
        )
    others = [(m.other, m.steal) for m in ([served, floor] if floor else [served])]
    if shared is not None:
        others.append((shared.other, shared.steal))
    print(other_load_warning(max(o for o, _ in others), max(s for _, s in others)))
    if shared is not None:
        masters = "1 master" if args.replicas == 1 else f"{args.replicas} masters"
        label = f">= {TARGET_RPS:,} answers/s ({masters})"
        rps = shared.answers / args.seconds
    else:
        label = f">= {TARGET_RPS:,} answers/s (1 master)"
        rps = served.result.answers / args.seconds
    targets: list[Target] = [(label, f"{rps:,.0f}", rps >= TARGET_RPS)]
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
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="master processes sharing the port in the h2load run; 0 skips that run",
    )
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    return run_in_scratch("latest", args.timeout, lambda workdir: run(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
