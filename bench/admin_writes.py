"""Admin write throughput: CreateChallenge, then UpdateChallenge, against a real master.

For each backend a fresh database and a real ``platform master`` child process
are started:

* ``sqlite``: the embedded default (WAL, synchronous=NORMAL, as the master sets it);
* ``postgresql``: a throwaway PostgreSQL server with the test suite's settings
  (fsync=off, synchronous_commit=off: commits never wait for the disk);
* ``postgresql-durable``: the same server with PostgreSQL's defaults (every
  commit is flushed to disk), which is what a production database does.

For each concurrency C (``--concurrency``, default 1 and 8), C clients, each on
its own connection, share ``--writes`` creates between them as fast as the master
answers, then update the description of the challenges they created (one field
mask path). Each client has one call in flight at a time. A few unmeasured
writes warm up every backend first. Reported per backend, operation and C:
writes/s (calls / wall time of the phase), call latency p50/p99/max as the
client sees it, and the master's CPU use during the phase.

Exit status: 0 when every write succeeded; 1 when any failed; 2 on an error or
the hard time limit.

    python -m bench.admin_writes [--backends sqlite,postgresql] [--concurrency 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import field_mask_pb2

from bench.common import (
    BenchTimeout,
    CpuMeter,
    command_line,
    cpu_seconds,
    database,
    fail,
    hard_timeout,
    machine,
    master_pid,
    master_process,
    other_load_warning,
    percentile,
    table,
)
from platform_network.v1 import registry_pb2, registry_pb2_grpc
from tests.support.master import ADMIN

MODULE = "bench.admin_writes"
BACKENDS = ("sqlite", "postgresql", "postgresql-durable")
WARMUP = 20


@dataclass
class Phase:
    backend: str
    operation: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    master_cpu: float = 0.0
    client_cpu: float = 0.0
    other_cpu: float = 0.0
    steal: float = 0.0
    database_cpu: float = math.nan


if TYPE_CHECKING:  # the async stub class exists only in the generated type stubs
    Stub = registry_pb2_grpc.RegistryAsyncStub
    # One write: (stub, client index, write index within the client) -> the call.
    WriteCall = Callable[[Stub, int, int], Awaitable[object]]


def spec(slug: str, description: str = "") -> registry_pb2.ChallengeSpec:
    return registry_pb2.ChallengeSpec(
        slug=slug,
        name=f"Bench {slug}",
        description=description,
        image=f"ghcr.io/platform-bench/{slug}:1.0.0",
        emission_share=0.01,
    )


async def run_phase(
    phase: Phase,
    stubs: Sequence[Stub],
    counts: Sequence[int],
    write: WriteCall,
    *,
    pid: int,
    meter: CpuMeter,
) -> None:
    """Run ``counts[k]`` writes on client ``k``, all clients at once; fill ``phase``."""

    async def client(k: int) -> None:
        stub = stubs[k]
        for i in range(counts[k]):
            started = time.perf_counter()
            try:
                await write(stub, k, i)
            except grpc.aio.AioRpcError as exc:
                phase.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            phase.latencies_ms.append((time.perf_counter() - started) * 1000)

    cpu0, client_cpu0, wall0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    meter.start()
    await asyncio.gather(*(client(k) for k in range(len(stubs))))
    _, phase.other_cpu = meter.stop()
    phase.steal = meter.steal
    if len(meter.per_root) > 1:  # the database server's processes
        phase.database_cpu = meter.per_root[1]
    phase.wall = time.perf_counter() - wall0
    phase.master_cpu = cpu_seconds(pid) - cpu0
    phase.client_cpu = time.process_time() - client_cpu0


async def measure(
    backend: str,
    address: str,
    *,
    pid: int,
    meter: CpuMeter,
    concurrency: Sequence[int],
    writes: int,
) -> list[Phase]:
    mask = field_mask_pb2.FieldMask(paths=["description"])
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client

    def create(prefix: str) -> WriteCall:
        async def call(stub: Stub, k: int, i: int) -> object:
            request = registry_pb2.CreateChallengeRequest(challenge=spec(f"{prefix}-{k}-{i}"))
            return await stub.CreateChallenge(request, metadata=ADMIN, timeout=30)

        return call

    def update(prefix: str) -> WriteCall:
        async def call(stub: Stub, k: int, i: int) -> object:
            request = registry_pb2.UpdateChallengeRequest(
                slug=f"{prefix}-{k}-{i}",
                challenge=registry_pb2.ChallengeSpec(description=f"update {time.time_ns()}"),
                update_mask=mask,
            )
            return await stub.UpdateChallenge(request, metadata=ADMIN, timeout=30)

        return call

    phases: list[Phase] = []
    warm = grpc.aio.insecure_channel(address, options=options)
    try:
        warm_phase = Phase(backend, "warm-up", 1)
        stub = registry_pb2_grpc.RegistryStub(warm)
        await run_phase(warm_phase, [stub], [WARMUP], create("warm"), pid=pid, meter=meter)
        await run_phase(warm_phase, [stub], [WARMUP], update("warm"), pid=pid, meter=meter)
        if warm_phase.errors:
            raise RuntimeError(f"warm-up writes failed: {warm_phase.errors[:3]}")
    finally:
        await warm.close()

    for clients in concurrency:
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(clients)]
        try:
            stubs = [registry_pb2_grpc.RegistryStub(ch) for ch in channels]
            for ch in channels:
                await ch.channel_ready()
            counts = [writes // clients + (k < writes % clients) for k in range(clients)]
            prefix = f"c{clients}"
            for operation, make in (("create", create), ("update", update)):
                phase = Phase(backend, operation, clients)
                await run_phase(phase, stubs, counts, make(prefix), pid=pid, meter=meter)
                phases.append(phase)
        finally:
            for ch in channels:
                await ch.close()
    return phases


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, from {', '.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,8",
        help="comma-separated numbers of concurrent clients (default 1,8)",
    )
    parser.add_argument(
        "--writes",
        type=int,
        default=500,
        help="writes per operation, backend and concurrency (default 500)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="hard limit for the whole run, s (default 900)"
    )
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency: comma-separated whole numbers")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: at least one value, each at least 1")
    if args.writes < max(args.concurrency):
        parser.error("--writes must be at least the largest --concurrency")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else list(argv)
    print(f"command: {command_line(MODULE, shown)}")
    print(f"machine: {machine()}")
    phases: list[Phase] = []
    try:
        with hard_timeout(args.timeout):
            for backend in args.backends:
                with (
                    tempfile.TemporaryDirectory(prefix="platform-bench-writes-") as tmp,
                    database(
                        backend.removesuffix("-durable"),
                        Path(tmp),
                        durable=backend.endswith("-durable"),
                    ) as db,
                    master_process(Path(tmp), db.url) as master,
                ):
                    roots = [os.getpid(), *([db.server_pid] if db.server_pid else [])]
                    phases += asyncio.run(
                        measure(
                            backend,
                            master.address,
                            pid=master_pid(master),
                            meter=CpuMeter(roots),
                            concurrency=args.concurrency,
                            writes=args.writes,
                        )
                    )
    except BenchTimeout as exc:
        fail(str(exc))
        return 2
    except Exception:
        traceback.print_exc()
        fail("the benchmark could not run to the end")
        return 2
    finally:
        if phases:
            report(phases)
    errors = [e for p in phases for e in p.errors]
    if errors:
        fail(f"{len(errors)} writes failed, e.g. {errors[:3]}")
        return 1
    return 0


def report(phases: Sequence[Phase]) -> None:
    print()
    print(
        table(
            [
                "backend",
                "operation",
                "clients",
                "writes",
                "writes/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "master CPU %",
                "client CPU %",
                "db server CPU %",
                "other CPU %",
                "steal %",
                "errors",
            ],
            [
                [
                    p.backend,
                    p.operation,
                    p.clients,
                    len(p.latencies_ms),
                    len(p.latencies_ms) / p.wall if p.wall else 0.0,
                    percentile(p.latencies_ms, 50),
                    percentile(p.latencies_ms, 99),
                    percentile(p.latencies_ms, 100),
                    p.master_cpu / p.wall * 100 if p.wall else 0.0,
                    p.client_cpu / p.wall * 100 if p.wall else 0.0,
                    p.database_cpu,
                    p.other_cpu,
                    p.steal,
                    len(p.errors),
                ]
                for p in phases
            ],
        )
    )
    print("CPU columns: % of one CPU during the phase. SQLite runs inside the master (no db")
    print("server); 'other' is every process outside the benchmark's own; 'steal' is CPU time")
    print("the hypervisor took from this virtual machine.")
    worst = other_load_warning(max(p.other_cpu for p in phases), max(p.steal for p in phases))
    print(worst.replace("on the machine used", "on the machine used at most"))


if __name__ == "__main__":
    sys.exit(main())
