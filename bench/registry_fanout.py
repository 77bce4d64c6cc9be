"""Registry fan-out: how long a committed admin write takes to reach every watcher.

A real ``platform master`` runs as a child process (SQLite, or PostgreSQL with
``--postgres``). Client worker processes (``--workers``, default 2) open
``--streams`` ``WatchRegistry`` streams between them and wait until every stream
has its initial snapshot. The benchmark then makes ``--writes`` admin writes
(``UpdateChallenge`` of the description), one at a time, ``--interval`` apart,
and for every (stream, write) pair measures the event's arrival time minus

* its commit: the event's ``commit_time``, which the master stamps inside the
  write transaction just before committing (so this slightly overstates). The
  p99 target applies to this figure;
* the moment the write RPC returned to the admin client. The master may start
  fanning the event out before it answers the write, so this one understates
  and can be negative;
* the moment the write RPC was sent (an upper bound).

Arrival times are CLOCK_MONOTONIC, one clock for every process of the machine;
commit_time is wall-clock time, converted with the offset between the two. The
stream side stamps each message as soon as ``read()`` hands it over and parses
it only after the measurement, so protobuf decoding in the client is not counted.

Exit status: 0 when every event arrived and both targets hold (p99 latency,
master RSS with all streams open); 1 when a target is missed or an event was
lost, duplicated or replaced by a resync; 2 on an error or the hard time limit.

    python -m bench.registry_fanout [--streams 1000] [--writes 30] [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

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
    peak_rss_mib,
    percentile,
    rss_mib,
    table,
)
from platform_network.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.support.master import ADMIN

MODULE = "bench.registry_fanout"
WATCH_METHOD = "/platform_network.v1.Registry/WatchRegistry"
SLUG = "bench-fanout"
MIB_PER_MB = 1e6 / 2**20

# One arrival as the workers report it: (monotonic time, payload kind, cursor
# revision, the event's commit_time in seconds since the epoch or nan).
Arrival = tuple[float, str, int, float]


# -- client worker process ------------------------------------------------------------


@dataclass
class WorkerReport:
    index: int
    streams: int
    arrivals: list[list[Arrival]]
    errors: list[str]
    open_seconds: float
    cpu_seconds: float
    wall_seconds: float
    loop_lag_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    address: str
    streams: int
    per_connection: int
    # Open the streams in waves of this many, each wave once the previous one has
    # its snapshots; 0: all at once.
    open_batch: int


def worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    """Entry point of a client worker process (spawned)."""
    try:
        asyncio.run(_worker(spec, pipe))
    except Exception as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"worker {spec.index}: {type(exc).__name__}: {exc}"))
        raise


async def _worker(spec: WorkerSpec, pipe: Connection) -> None:
    index, streams, per_connection = spec.index, spec.streams, spec.per_connection
    address = spec.address
    loop = asyncio.get_running_loop()
    parent = os.getppid()
    # A separate subchannel pool per channel: one TCP connection per channel, as
    # separate validators would have.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(address, options=options)
        for _ in range(math.ceil(streams / per_connection))
    ]
    # No response deserializer: the stream hands over raw bytes, stamped on arrival.
    watch_calls: list[
        grpc.aio.UnaryStreamMultiCallable[registry_pb2.WatchRegistryRequest, bytes]
    ] = [
        ch.unary_stream(
            WATCH_METHOD,
            request_serializer=registry_pb2.WatchRegistryRequest.SerializeToString,
            response_deserializer=None,
        )
        for ch in channels
    ]
    request = registry_pb2.WatchRegistryRequest(since_revision=0)
    logs: list[list[tuple[float, bytes]]] = [[] for _ in range(streams)]
    errors: list[str] = []
    calls: list[Any] = []
    settled = 0
    progress = asyncio.Event()
    stopping = False

    def settle() -> None:
        nonlocal settled
        settled += 1
        progress.set()

    async def watch(i: int) -> None:
        log = logs[i]
        call = watch_calls[i // per_connection](request, metadata=ADMIN)
        calls.append(call)
        try:
            while True:
                raw = await call.read()
                now = time.monotonic()
                if not isinstance(raw, bytes):  # grpc.aio.EOF
                    errors.append(f"stream {index}.{i}: ended by the server")
                    break
                log.append((now, raw))
                if len(log) == 1:
                    settle()
        except grpc.aio.AioRpcError as exc:
            if not stopping:
                errors.append(f"stream {index}.{i}: {exc.code().name}: {exc.details()}")
        if not log:
            settle()

    async def orphan_guard() -> None:
        # The parent's death has no event to wait on: poll for re-parenting.
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(1)
        os._exit(3)

    lags: list[float] = []

    async def lag_probe() -> None:
        # How late the client's own event loop wakes up: its queueing delay.
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append((time.monotonic() - start - 0.005) * 1000)

    guard = asyncio.create_task(orphan_guard())
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    batch = spec.open_batch or streams
    for first in range(0, streams, batch):
        tasks += [asyncio.create_task(watch(i)) for i in range(first, min(streams, first + batch))]
        while settled < len(tasks):
            progress.clear()
            await progress.wait()
    open_seconds = time.monotonic() - started
    pipe.send(("ready", settled - len(errors), list(errors[:5]), open_seconds))

    probe = asyncio.create_task(lag_probe())
    cpu0, wall0 = time.process_time(), time.monotonic()
    command = await loop.run_in_executor(None, pipe.recv)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    probe.cancel()
    if command[0] != "collect":
        return
    _, last_revision, drain_seconds = command

    # Wait until every live stream has seen the last write (or the drain time ends).
    deadline = time.monotonic() + drain_seconds
    while time.monotonic() < deadline:
        behind = [
            i
            for i, log in enumerate(logs)
            if not tasks[i].done() and _revision(log[-1][1]) < last_revision
        ]
        if not behind:
            break
        await asyncio.sleep(0.02)

    stopping = True
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    guard.cancel()

    arrivals = [[(t, *_describe(raw)) for t, raw in log] for log in logs]
    report = WorkerReport(index, streams, arrivals, errors, open_seconds, cpu, wall, lags)
    pipe.send(("result", report))


def _revision(raw: bytes) -> int:
    return registry_pb2.WatchRegistryResponse.FromString(raw).cursor.revision


def _describe(raw: bytes) -> tuple[str, int, float]:
    message = registry_pb2.WatchRegistryResponse.FromString(raw)
    kind: str = message.WhichOneof("payload") or "empty"
    commit = math.nan
    if kind == "snapshot":
        kind += ":" + common_pb2.SnapshotReason.Name(message.snapshot.reason)
    elif kind == "event":
        commit = message.event.commit_time.ToNanoseconds() / 1e9
    return kind, message.cursor.revision, commit


# -- the driver -------------------------------------------------------------------------


@dataclass
class Write:
    started: float
    returned: float


@dataclass
class Outcome:
    lat_commit_ms: list[float] = field(default_factory=list)
    lat_return_ms: list[float] = field(default_factory=list)
    lat_start_ms: list[float] = field(default_factory=list)
    reach_all_ms: list[float] = field(default_factory=list)
    reach_first_ms: list[float] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)
    received: int = 0
    expected: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    resyncs: int = 0
    bookmarks: int = 0
    bad_first: int = 0


def analyse(
    reports: Sequence[WorkerReport], writes: dict[int, Write], wall_minus_monotonic: float
) -> Outcome:
    """Latencies and delivery counts. ``wall_minus_monotonic`` converts the events'
    commit_time (wall clock) to CLOCK_MONOTONIC."""
    out = Outcome()
    commit: dict[int, float] = {}
    first: dict[int, float] = dict.fromkeys(writes, math.inf)
    last: dict[int, float] = dict.fromkeys(writes, -math.inf)
    for report in reports:
        for log in report.arrivals:
            out.expected += len(writes)
            if not log or not log[0][1].startswith("snapshot:SNAPSHOT_REASON_INITIAL"):
                out.bad_first += 1
            seen: set[int] = set()
            previous = 0
            for t, kind, revision, committed in log[1:]:
                if kind.startswith("snapshot"):
                    out.resyncs += 1
                elif kind == "bookmark":
                    out.bookmarks += 1
                elif kind == "event" and revision in writes:
                    if revision in seen:
                        out.duplicates += 1
                        continue
                    if revision < previous:
                        out.out_of_order += 1
                    previous = revision
                    seen.add(revision)
                    write = writes[revision]
                    commit[revision] = committed - wall_minus_monotonic
                    out.lat_commit_ms.append((t - commit[revision]) * 1000)
                    out.lat_return_ms.append((t - write.returned) * 1000)
                    out.lat_start_ms.append((t - write.started) * 1000)
                    first[revision] = min(first[revision], t)
                    last[revision] = max(last[revision], t)
            out.received += len(seen)
    for revision, write in writes.items():
        if revision in commit:
            out.reach_all_ms.append((last[revision] - commit[revision]) * 1000)
            out.reach_first_ms.append((first[revision] - commit[revision]) * 1000)
            out.commit_ms.append((write.returned - commit[revision]) * 1000)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--streams", type=int, default=1000, help="watch streams (default 1000)")
    parser.add_argument("--writes", type=int, default=30, help="admin writes (default 30)")
    parser.add_argument(
        "--interval", type=float, default=0.1, help="seconds between write starts (default 0.1)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="client processes holding the streams (default 2)"
    )
    parser.add_argument(
        "--streams-per-connection",
        type=int,
        default=1,
        help="streams sharing one HTTP/2 connection (default 1: a connection per watcher)",
    )
    parser.add_argument(
        "--open-batch",
        type=int,
        default=0,
        help="each client process opens its streams in waves of this many (default 0: all at once)",
    )
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument(
        "--bookmark-interval",
        type=float,
        default=3600,
        help="the master's --bookmark-interval, high so no bookmark mixes in (default 3600)",
    )
    parser.add_argument("--p99-target-ms", type=float, default=200.0)
    parser.add_argument("--rss-target-mb", type=float, default=300.0)
    parser.add_argument(
        "--timeout", type=float, default=600, help="hard limit for the whole run, s (default 600)"
    )
    args = parser.parse_args(argv)
    if args.streams < 1 or args.writes < 1 or args.workers < 1:
        parser.error("--streams, --writes and --workers must be at least 1")
    if args.open_batch < 0:
        parser.error("--open-batch must be 0 or more")
    if args.streams_per_connection < 1:
        parser.error("--streams-per-connection must be at least 1")
    args.workers = min(args.workers, args.streams)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else list(argv)
    print(f"command: {command_line(MODULE, shown)}")
    print(f"machine: {machine()}")
    try:
        with hard_timeout(args.timeout):
            return run(args)
    except BenchTimeout as exc:
        fail(str(exc))
        return 2
    except Exception:
        traceback.print_exc()
        fail("the benchmark could not run to the end")
        return 2


def run(args: argparse.Namespace) -> int:
    backend = "postgresql" if args.postgres else "sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    pipes: list[Connection] = []
    with (
        tempfile.TemporaryDirectory(prefix="platform-bench-fanout-") as tmp,
        database(backend, Path(tmp)) as db,
        master_process(
            Path(tmp), db.url, "--bookmark-interval", str(args.bookmark_interval)
        ) as master,
    ):
        pid = master_pid(master)
        rc = 2
        try:
            rc = drive(
                args,
                backend=backend,
                address=master.address,
                pid=pid,
                meter=CpuMeter([os.getpid(), *([db.server_pid] if db.server_pid else [])]),
                ctx=ctx,
                procs=procs,
                pipes=pipes,
            )
            return rc
        finally:
            problems = [line for line in master.log().splitlines() if '"level":"info"' not in line]
            if rc != 0 and problems:
                print("the master logged:", *problems[-15:], sep="\n  ", file=sys.stderr)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            for pipe in pipes:
                pipe.close()


def drive(
    args: argparse.Namespace,
    *,
    backend: str,
    address: str,
    pid: int,
    meter: CpuMeter,
    ctx: Any,
    procs: list[BaseProcess],
    pipes: list[Connection],
) -> int:
    channel = grpc.insecure_channel(address)
    stub = registry_pb2_grpc.RegistryStub(channel)
    stub.CreateChallenge(
        registry_pb2.CreateChallengeRequest(
            challenge=registry_pb2.ChallengeSpec(
                slug=SLUG,
                name="Bench fan-out",
                image=f"ghcr.io/platform-bench/{SLUG}:1.0.0",
                emission_share=0.1,
            )
        ),
        metadata=ADMIN,
        timeout=10,
    )
    time.sleep(0.5)
    rss_idle = rss_mib(pid)

    # Open the streams.
    shares = [
        args.streams // args.workers + (i < args.streams % args.workers)
        for i in range(args.workers)
    ]
    for i, share in enumerate(shares):
        here, there = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main,
            args=(
                WorkerSpec(i, address, share, args.streams_per_connection, args.open_batch),
                there,
            ),
            name=f"fanout-worker-{i}",
            daemon=True,
        )
        proc.start()
        there.close()
        procs.append(proc)
        pipes.append(here)
    opened = 0
    open_seconds = 0.0
    open_errors: list[str] = []
    for pipe in pipes:
        message = _receive(pipe, 120)
        if message[0] == "error":
            fail(message[1])
            return 2
        _, ok, errs, seconds = message
        opened += ok
        open_errors += errs
        open_seconds = max(open_seconds, seconds)
    print(f"streams with their initial snapshot: {opened}/{args.streams} in {open_seconds:.1f} s")
    if opened < args.streams:
        fail(
            f"{args.streams - opened} streams failed to open, e.g. {open_errors[:3]}; "
            "CANCELLED on open means the burst of new calls overflowed gRPC's queue of calls "
            "the server had not picked up yet (grpc.server.max_pending_requests on the "
            "master); --open-batch opens the streams in waves"
        )
        return 1

    time.sleep(1.0)  # let the master settle after sending the snapshots
    idle0, idle_wall0 = cpu_seconds(pid), time.monotonic()
    time.sleep(3.0)
    idle_percent = (cpu_seconds(pid) - idle0) / (time.monotonic() - idle_wall0) * 100
    rss_open = rss_mib(pid)
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    meter.start()

    # The writes, one at a time.
    writes: dict[int, Write] = {}
    mask = field_mask_pb2.FieldMask(paths=["description"])
    for n in range(args.writes):
        request = registry_pb2.UpdateChallengeRequest(
            slug=SLUG,
            challenge=registry_pb2.ChallengeSpec(description=f"fan-out write {n}"),
            update_mask=mask,
        )
        started = time.monotonic()
        reply = stub.UpdateChallenge(request, metadata=ADMIN, timeout=10)
        returned = time.monotonic()
        writes[reply.revision] = Write(started, returned)
        pause = started + args.interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    time.sleep(1.0)  # the last write's fan-out
    wall_minus_monotonic = time.time() - time.monotonic()
    master_cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - wall0
    own_percent, other_percent = meter.stop()
    rss_after = rss_mib(pid)
    rss_peak = peak_rss_mib(pid)
    channel.close()

    for pipe in pipes:
        pipe.send(("collect", max(writes), 15.0))
    reports: list[WorkerReport] = []
    for pipe in pipes:
        message = _receive(pipe, 120)
        if message[0] == "error":
            fail(message[1])
            return 2
        reports.append(message[1])

    out = analyse(reports, writes, wall_minus_monotonic)
    errors = [e for r in reports for e in r.errors]
    return report(
        args,
        backend=backend,
        out=out,
        writes=writes,
        reports=reports,
        errors=errors,
        rss_idle=rss_idle,
        rss_open=rss_open,
        rss_after=rss_after,
        rss_peak=rss_peak,
        master_cpu=master_cpu,
        wall=wall,
        idle_percent=idle_percent,
        load=(own_percent, other_percent, meter.steal),
    )


def _receive(pipe: Connection, timeout: float) -> tuple[Any, ...]:
    """The next message from a worker, or ("error", why) if it died or went silent."""
    try:
        if not pipe.poll(timeout):
            return ("error", f"a client worker sent nothing for {timeout:.0f} s")
        message: tuple[Any, ...] = pipe.recv()
    except (EOFError, OSError):
        return ("error", "a client worker exited unexpectedly")
    return message


def report(
    args: argparse.Namespace,
    *,
    backend: str,
    out: Outcome,
    writes: dict[int, Write],
    reports: Sequence[WorkerReport],
    errors: Sequence[str],
    rss_idle: float,
    rss_open: float,
    rss_after: float,
    rss_peak: float,
    master_cpu: float,
    wall: float,
    idle_percent: float,
    load: tuple[float, float, float],
) -> int:
    db = "PostgreSQL" if backend == "postgresql" else "SQLite"
    print()
    print(
        f"registry fan-out on {db}: {args.streams} streams in {args.workers} client processes "
        f"({args.streams_per_connection} per connection), {args.writes} writes "
        f"{args.interval * 1000:.0f} ms apart"
        + (f"; streams opened in waves of {args.open_batch}" if args.open_batch else "")
    )
    lost = out.expected - out.received
    print(
        f"events delivered: {out.received}/{out.expected}  lost {lost}  "
        f"duplicates {out.duplicates}  out of order {out.out_of_order}  resyncs {out.resyncs}  "
        f"bookmarks {out.bookmarks}  stream errors {len(errors)}"
    )
    print()

    def row(name: str, values: Sequence[float]) -> list[object]:
        quantiles = (percentile(values, q) for q in (50, 95, 99, 100))
        return [name, len(values), min(values, default=math.nan), *quantiles]

    write_ms = [(w.returned - w.started) * 1000 for w in writes.values()]
    print(
        table(
            ["latency, ms", "n", "min", "p50", "p95", "p99", "max"],
            [
                row("event arrival - commit", out.lat_commit_ms),
                row("event arrival - write returned", out.lat_return_ms),
                row("event arrival - write started", out.lat_start_ms),
                row("first stream, per write - commit", out.reach_first_ms),
                row("every stream, per write - commit", out.reach_all_ms),
                row("write RPC", write_ms),
                row("write returned - commit", out.commit_ms),
            ],
        )
    )
    print()
    to_mb = 1 / MIB_PER_MB
    print(
        table(
            ["master", "value"],
            [
                ["RSS idle, before streams (MB)", rss_idle * to_mb],
                ["RSS streams open, before writes (MB)", rss_open * to_mb],
                ["RSS streams open, after writes (MB)", rss_after * to_mb],
                ["peak RSS VmHWM (MB)", rss_peak * to_mb],
                ["CPU, streams open and no writes (%)", idle_percent],
                ["CPU during the write phase (s)", master_cpu],
                ["  of wall time (%)", master_cpu / wall * 100],
                ["  per write (ms)", master_cpu / len(writes) * 1000],
            ],
        )
    )
    print()
    print(
        table(
            ["client process", "streams", "open s", "CPU %", "loop lag p99 ms", "lag max ms"],
            [
                [
                    f"worker {r.index}",
                    r.streams,
                    r.open_seconds,
                    r.cpu_seconds / r.wall_seconds * 100 if r.wall_seconds else math.nan,
                    percentile(r.loop_lag_ms, 99),
                    percentile(r.loop_lag_ms, 100),
                ]
                for r in reports
            ],
        )
    )
    own_percent, other_percent, steal_percent = load
    print(
        "during the write phase the benchmark's processes (master, clients, database) "
        f"used {own_percent:.0f}% of one CPU;"
    )
    print(other_load_warning(other_percent, steal_percent))
    print()

    failures = []
    if lost or out.duplicates or out.out_of_order or out.resyncs or out.bad_first:
        failures.append("events were lost, duplicated, reordered or replaced by a resync")
    if errors:
        failures.append(f"{len(errors)} stream errors, e.g. {list(errors[:3])}")
    p99 = percentile(out.lat_commit_ms, 99)
    rss_streams_mb = max(rss_open, rss_after) * to_mb
    verdicts = [
        (
            f"p99 commit-to-event latency {p99:.1f} ms <= {args.p99_target_ms:.0f} ms",
            p99 <= args.p99_target_ms,
        ),
        (
            f"master RSS with streams open {rss_streams_mb:.0f} MB <= {args.rss_target_mb:.0f} MB",
            rss_streams_mb <= args.rss_target_mb,
        ),
        (f"every event delivered once ({out.received}/{out.expected})", not failures),
    ]
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    for problem in failures:
        fail(problem)
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
