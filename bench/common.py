"""Shared plumbing of the benchmarks: databases, the master process, /proc readings,
statistics, tables and a hard time limit."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc

from platform_common import grpc_setup
from tests.support.master import MasterProcess
from tests.support.postgres import PostgresServer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The environment of a challenge stand-in (bench.challenge_farm): gRPC's own defaults, as
# in a challenge's process, not the switches the platform's processes start with.
CHALLENGE_ENV = {grpc_setup.ENV: ""}


class BenchTimeout(Exception):
    """The benchmark's hard time limit passed, or it was told to stop."""


@contextlib.contextmanager
def hard_timeout(seconds: float) -> Iterator[None]:
    """Raise :class:`BenchTimeout` in the main thread once ``seconds`` have passed
    or on SIGTERM, so that every ``finally`` runs and stops what was started."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise BenchTimeout(f"hard time limit of {seconds:.0f} s reached")

    def terminate(_signum: int, _frame: FrameType | None) -> None:
        raise BenchTimeout("stopped by SIGTERM")

    previous = signal.signal(signal.SIGALRM, expire)
    previous_term = signal.signal(signal.SIGTERM, terminate)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGTERM, previous_term)


def run_guarded(timeout: float, body: Callable[[], int]) -> int:
    """``body`` within the hard time limit: its exit status, or 2 (after saying why) when
    it ran out of time or raised."""
    try:
        with hard_timeout(timeout):
            return body()
    except BenchTimeout as exc:
        fail(str(exc))
        return 2
    except Exception:
        traceback.print_exc()
        return 2


def run_in_scratch(name: str, timeout: float, body: Callable[[Path], int]) -> int:
    """``body`` in a fresh scratch directory under the repository's ``.tmp``, guarded as
    :func:`run_guarded` does."""
    scratch = Path(__file__).resolve().parents[1] / ".tmp"
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=f"bench-{name}-") as tmp:
        return run_guarded(timeout, lambda: body(Path(tmp)))


# -- databases and the master ---------------------------------------------------------


@dataclass(frozen=True)
class Database:
    url: str
    # Processes of the database server (none for SQLite), for CPU accounting.
    server_pid: int | None = None


@contextlib.contextmanager
def database(backend: str, workdir: Path, *, durable: bool = False) -> Iterator[Database]:
    """A fresh, empty database on ``backend`` ("sqlite" or "postgresql").
    The master migrates it at start-up."""
    if backend == "sqlite":
        yield Database(f"sqlite+aiosqlite:///{workdir / 'registry.db'}")
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}")
    server = PostgresServer(workdir / "pg", durable=durable)
    try:
        server.start()
        url = asyncio.run(server.create_database("platform_bench"))
        pid = int((server.data / "postmaster.pid").read_text().split()[0])
        yield Database(url, pid)
    finally:
        server.stop()


@contextlib.contextmanager
def master_process(workdir: Path, database_url: str, *extra: str) -> Iterator[MasterProcess]:
    """A real ``platform master`` child process; stopped (by PID) on exit."""
    master = MasterProcess(workdir / "master", database_url, *extra)
    try:
        master.start()
        yield master
    finally:
        master.stop()


def master_pid(master: MasterProcess) -> int:
    assert master.proc is not None
    return master.proc.pid


def wait_serving(address: str, timeout: float = 10) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10
) -> None:
    """Stop a child by its PID: ``sig``, up to ``timeout`` seconds to exit, then SIGKILL;
    reaped either way."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- /proc readings -------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def rss_mib(pid: int) -> float:
    """Resident set size (VmRSS) of ``pid`` in MiB."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` in MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time ``pid`` has used so far (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5), counted from the state field (3).
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (all threads)."""
    return sum(cpu_split(pid))


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time all CPUs of this (virtual) machine have spent running its processes and
    kernel since boot, and the time the hypervisor took from them (steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuMeter:
    """CPU used over a phase by the benchmark's own processes (the trees under
    ``roots``) and by everything else on the machine."""

    def __init__(self, roots: Sequence[int]) -> None:
        self._roots = list(roots)
        self._start: dict[int, float] = {}
        self._busy = (0.0, 0.0)
        self._wall = 0.0
        self.per_root: list[float] = []
        self.steal = 0.0

    def _sample(self) -> dict[int, float]:
        out = {}
        for root in self._roots:
            for pid in descendants(root):
                with contextlib.suppress(OSError, ValueError):
                    out[pid] = cpu_seconds(pid)
        return out

    def start(self) -> None:
        self._start = self._sample()
        self._busy = machine_busy_seconds()
        self._wall = time.monotonic()

    def stop(self) -> tuple[float, float]:
        """(own, other) CPU use since :meth:`start`, each in % of one CPU;
        :attr:`per_root` then holds the share of each root's tree and :attr:`steal`
        the CPU the hypervisor took from this machine."""
        end = self._sample()
        busy_now, steal_now = machine_busy_seconds()
        wall = time.monotonic() - self._wall
        busy = busy_now - self._busy[0]
        self.steal = (steal_now - self._busy[1]) / wall * 100
        used = {pid: t - self._start.get(pid, 0.0) for pid, t in end.items()}
        own = sum(used.values())
        self.per_root = [
            sum(used.get(pid, 0.0) for pid in descendants(root)) / wall * 100
            for root in self._roots
        ]
        return own / wall * 100, max(0.0, busy - own) / wall * 100


def other_load_warning(other_percent: float, steal_percent: float) -> str:
    """Lines for the output, loud when something outside the benchmark took CPU time:
    other processes of this machine, or the hypervisor (steal)."""
    text = (
        f"other processes on the machine used {other_percent:.0f}% of one CPU and the "
        f"hypervisor took {steal_percent:.0f}% (steal)"
    )
    if max(other_percent, steal_percent) > 10:
        return f"WARNING: {text}; the figures above are skewed by it"
    return text


# -- statistics and output ---------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def command_line(module: str, argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({model or platform.machine()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


#: A benchmark target: what it says, the figure measured, whether it holds.
Target = tuple[str, str, bool]


def print_targets(targets: Sequence[Target]) -> None:
    """The closing table of a benchmark: each target, its figure, PASS or MISS."""
    print()
    print(
        table(
            ["target", "measured", "result"],
            [[what, measured, "PASS" if ok else "MISS"] for what, measured, ok in targets],
        )
    )


def targets_status(targets: Sequence[Target]) -> int:
    """0 when every target holds; otherwise 1, after saying so on stderr."""
    if all(ok for _, _, ok in targets):
        return 0
    fail("a target was missed" if len(targets) > 1 else "the target was missed")
    return 1


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
