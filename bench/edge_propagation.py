"""Propagation: from a committed ``SetChallengeStatus(ACTIVE)`` to the route answering 200.

The same site as ``bench.edge`` (a ``platform master`` process with the edge on, a real
Envoy configured by it over xDS, nginx as the ``static`` challenge's upstream). Each
trial:

1. ``SetChallengeStatus(INACTIVE)``, then wait until the edge answers 404 for the route
   (the removal has converged) and a little longer (``--gap``), so that one trial's
   configuration push never overlaps the next;
2. ``SetChallengeStatus(ACTIVE)``: the call returns once the change is committed;
3. poll the route through Envoy on one keep-alive connection, back to back, until it
   answers 200.

Reported per trial: *from commit* (the call returned -> the first 200; the figure of the
target: the master stamps the commit inside the call, a few milliseconds before it
returns, so this slightly understates) and *from the call* (the call was sent -> the first
200). The path to 200 is: the registry feed hands the event to the edge controller, the
translator builds the resources, the xDS server publishes them, and Envoy applies
CDS/EDS before LDS/RDS (make-before-break). The gap between trials is longer than the
xDS debounce (100 ms), so each activation is a change after a quiet period, which the
xDS server publishes at once; a change that closely follows another one waits up to
the debounce more.

Target: p99 from commit <= 150 ms over 50 trials.

Needs ``nginx`` (Debian: ``apt-get install -y nginx``). Exit status: 0 when the target
holds, 1 when it is missed, 2 on an error.

    python -m bench.edge_propagation [--trials 50] [--gap 0.3] [--postgres]
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import time
from pathlib import Path

import grpc

from bench.common import (
    CpuMeter,
    Target,
    command_line,
    database,
    machine,
    other_load_warning,
    percentile,
    print_targets,
    run_in_scratch,
    table,
    targets_status,
)
from bench.edge import STATIC, STATIC_FILE, find_tools, site
from platform_network.v1 import registry_pb2, registry_pb2_grpc
from tests.helpers import ACTIVE, INACTIVE
from tests.support.master import ADMIN

MODULE = "bench.edge_propagation"
TARGET_P99_MS = 150.0
POLL_TIMEOUT_S = 10.0


class Poller:
    """GETs to the edge on one keep-alive connection (reopened if Envoy closes it)."""

    def __init__(self, port: int, target: str) -> None:
        self.port = port
        self.target = target
        self.connection: http.client.HTTPConnection | None = None

    def status(self) -> int:
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                self.connection.request("GET", self.target)
                answer = self.connection.getresponse()
                answer.read()
                if answer.getheader("connection", "").lower() == "close":
                    self.close()
                return answer.status
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def until(self, status: int, deadline: float) -> float:
        """Poll until ``status``; the monotonic time it was first seen."""
        while True:
            if self.status() == status:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the edge did not answer {self.target} with {status}")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run(args: argparse.Namespace, workdir: Path, nginx: str) -> int:
    backend = "postgresql" if args.postgres else "sqlite"
    from_commit: list[float] = []
    from_call: list[float] = []
    with database(backend, workdir, durable=True) as db, site(workdir, nginx, db.url) as s:
        poller = Poller(s.edge_port, f"/challenges/{STATIC}/{STATIC_FILE}")
        meter = CpuMeter([os.getpid()])
        with grpc.insecure_channel(s.master_address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)

            def set_status(status: registry_pb2.ChallengeStatus.ValueType) -> None:
                registry.SetChallengeStatus(
                    registry_pb2.SetChallengeStatusRequest(slug=STATIC, status=status),
                    metadata=ADMIN,
                )

            meter.start()
            try:
                for _ in range(args.trials):
                    set_status(INACTIVE)
                    poller.until(404, time.monotonic() + POLL_TIMEOUT_S)
                    time.sleep(args.gap)
                    sent = time.monotonic()
                    set_status(ACTIVE)
                    committed = time.monotonic()
                    served = poller.until(200, committed + POLL_TIMEOUT_S)
                    from_commit.append((served - committed) * 1000)
                    from_call.append((served - sent) * 1000)
            finally:
                poller.close()
                _, other = meter.stop()

    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(
        f"{args.trials} trials, master on {backend}; a trial starts {args.gap:g} s after the "
        "previous removal converged"
    )
    print(
        table(
            ["SetChallengeStatus(ACTIVE) -> 200 via Envoy", "min ms", "p50 ms", "p99 ms", "max ms"],
            [
                [name, *(f"{percentile(values, q):.1f}" for q in (0, 50, 99, 100))]
                for name, values in (("from commit", from_commit), ("from the call", from_call))
            ],
        )
    )
    print(other_load_warning(other, meter.steal))
    p99 = percentile(from_commit, 99)
    targets: list[Target] = [
        (f"p99 from commit <= {TARGET_P99_MS:g} ms", f"{p99:.1f} ms", p99 <= TARGET_P99_MS)
    ]
    print_targets(targets)
    return targets_status(targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50, help="activations measured")
    parser.add_argument(
        "--gap", type=float, default=0.3, help="seconds between a converged removal and the next"
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="the master on a throwaway PostgreSQL server (durable commits) instead of SQLite",
    )
    parser.add_argument("--timeout", type=float, default=300, help="hard time limit, seconds")
    args = parser.parse_args()
    if args.trials < 1 or args.gap < 0:
        parser.error("--trials must be at least 1 and --gap not negative")
    tools = find_tools(MODULE, need_wrk=False)
    if tools is None:
        return 2
    _, nginx = tools
    return run_in_scratch("propagation", args.timeout, lambda workdir: run(args, workdir, nginx))


if __name__ == "__main__":
    sys.exit(main())
