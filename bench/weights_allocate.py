"""Weight allocation speed: how long ``platform_common.weights.allocate`` takes per epoch.

Two shapes, each allocated ``--runs`` times in this process after one unmeasured run:

* 64 challenges x 256 hotkeys on a 256-neuron metagraph, every hotkey scored by every
  challenge (the most UIDs shared between challenges, so the most exact sums);
* 1 challenge x 65,536 hotkeys on a 65,536-neuron metagraph (the largest answer the
  shim lets through, every hotkey registered), answer order unrelated to UID order.

Scores are random, drawn from a fixed seed. Reported per shape: min, p50, p99 and max
wall time of one ``allocate`` call. The target applies to the p50.

Exit status: 0 when both targets hold; 1 when one is missed; 2 on an error or the hard
time limit.

    python -m bench.weights_allocate [--runs 200] [--timeout 120]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import (
    CpuMeter,
    command_line,
    fail,
    machine,
    other_load_warning,
    percentile,
    run_guarded,
    table,
)
from platform_common.weights import PPB, ChallengeInput, Policy, allocate

MODULE = "bench.weights_allocate"
SEED = 20_260_101


@dataclass(frozen=True)
class Shape:
    name: str
    challenges: list[ChallengeInput]
    hotkey_to_uid: dict[str, int]
    target_ms: float


def hotkey(uid: int) -> str:
    # Distinct strings of an SS58 address's length; the allocation never parses them.
    return f"5{uid:047d}"


def shapes(rng: random.Random) -> list[Shape]:
    small = {hotkey(uid): uid for uid in range(256)}
    many = [
        ChallengeInput(
            slug=f"challenge-{index:02d}",
            share_ppb=PPB // 64,
            scores=[(hotkey(uid), rng.random()) for uid in rng.sample(range(256), 256)],
        )
        for index in range(64)
    ]
    large = {hotkey(uid): uid for uid in range(65_536)}
    one = [
        ChallengeInput(
            slug="challenge-00",
            share_ppb=PPB,
            scores=[(hotkey(uid), rng.random()) for uid in rng.sample(range(65_536), 65_536)],
        )
    ]
    return [
        Shape("64 challenges x 256 hotkeys, 256 neurons", many, small, 10.0),
        Shape("1 challenge x 65,536 hotkeys, 65,536 neurons", one, large, 100.0),
    ]


def measure(shape: Shape, runs: int) -> list[float]:
    """Wall time of each of ``runs`` calls, in ms, after one unmeasured call."""
    allocate(shape.challenges, shape.hotkey_to_uid, burn_uid=0, policy=Policy.BURN)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        allocate(shape.challenges, shape.hotkey_to_uid, burn_uid=0, policy=Policy.BURN)
        times.append((time.perf_counter() - start) * 1000)
    return times


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--runs", type=int, default=200, help="measured calls per shape")
    parser.add_argument("--timeout", type=float, default=120.0, help="hard time limit, seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shown = list(argv) if argv is not None else sys.argv[1:]
    print(f"command: {command_line(MODULE, shown)}")
    print(f"machine: {machine()}")
    return run_guarded(args.timeout, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    rows: list[list[object]] = []
    missed: list[str] = []
    meter = CpuMeter([os.getpid()])
    inputs = shapes(random.Random(SEED))
    gc.collect()
    meter.start()
    for shape in inputs:
        times = measure(shape, args.runs)
        p50 = percentile(times, 50)
        rows.append(
            [
                shape.name,
                min(times),
                p50,
                percentile(times, 99),
                max(times),
                shape.target_ms,
                "yes" if p50 <= shape.target_ms else "NO",
            ]
        )
        if p50 > shape.target_ms:
            missed.append(f"{shape.name}: p50 {p50:.1f} ms > {shape.target_ms:.0f} ms")
    _own, other = meter.stop()
    print()
    print(
        table(
            ["shape", "min ms", "p50 ms", "p99 ms", "max ms", "target p50 ms", "met"],
            rows,
        )
    )
    print()
    print(f"{args.runs} measured calls per shape, one process, the machine otherwise as found.")
    print(other_load_warning(other, meter.steal))
    for line in missed:
        fail(line)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
