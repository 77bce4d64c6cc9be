"""The edge benchmarks' own machinery: bench.edge's one-CPU latency runs move every thread
onto the CPU and give each its own CPU set back; bench.edge_instructions' configurations
(the edge, the edge without each rule, the reference) are all ones Envoy accepts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.edge import sharing_one_cpu
from bench.edge_instructions import RULES, configurations
from tests.edge.envoy_support import validate

CPUS = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to tell sets apart")

# A parent with a second thread, and a child process of its own: a tree of three threads.
TREE = """
import subprocess, sys, threading, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print(child.pid, flush=True)
time.sleep(60)
"""


def _affinities(pid: int) -> dict[int, set[int]]:
    return {
        int(task.name): os.sched_getaffinity(int(task.name))
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    """(parent PID, child PID), both stopped by PID afterwards."""
    parent = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 10
        while len(_affinities(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        yield parent.pid, child
    finally:
        for pid in (child, parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


@two_cpus
def test_every_thread_shares_the_cpu_and_gets_its_own_set_back(tree: tuple[int, int]) -> None:
    parent, child = tree
    first, last = CPUS[0], CPUS[-1]
    # Different starting sets: the parent's second thread on the first CPU only.
    second_thread = max(_affinities(parent))
    os.sched_setaffinity(second_thread, {first})
    before = {pid: _affinities(pid) for pid in (parent, child)}
    caller_before = os.sched_getaffinity(threading.get_native_id())
    assert before[parent][second_thread] == {first}

    with sharing_one_cpu([parent], last):
        for pid in (parent, child):
            assert set(map(frozenset, _affinities(pid).values())) == {frozenset({last})}
        # The calling thread too, so the wrk it starts runs there.
        assert os.sched_getaffinity(threading.get_native_id()) == {last}

    assert {pid: _affinities(pid) for pid in (parent, child)} == before
    assert os.sched_getaffinity(threading.get_native_id()) == caller_before


def test_every_instructions_configuration_is_one_envoy_accepts(tmp_path: Path) -> None:
    # configurations() refuses a rule whose removal changes nothing (a renamed filter).
    found = configurations(listen_port=18080, upstream_port=18081)
    assert list(found) == ["edge", *(f"edge without {rule}" for rule in RULES), "reference"]
    assert "overload_manager" in found["edge"]
    for name, bootstrap in found.items():
        done = validate(bootstrap, tmp_path)
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
