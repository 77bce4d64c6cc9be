"""Sum Bench, native flavour: a sample challenge built on the Python SDK (gRPC).

Miners solve small deterministic tasks ("add these numbers") through a public HTTP
API; each task solved earns one point. The platform collects the points every
epoch through ChallengeInternal.GetWeights, served by the SDK from memory.

Run from the repository root (ports 0 pick free ones; see --ready-file)::

    python examples/challenges/native/challenge.py \\
        --internal 127.0.0.1:50070 --public 127.0.0.1:8080

Public API (behind the edge at /challenges/{slug}/; the edge verifies the miner's
signature and sets X-Platform-Verified-Hotkey, which in dev you set yourself):

* ``GET /task?id=N``: task N (default 1) as ``{"task_id": N, "numbers": [...]}``;
* ``POST /submit`` with ``{"task_id": N, "answer": <sum>}``: one point per task solved;
* ``GET /leaderboard``: ``[{"hotkey": ..., "score": ...}]``, best first.

``--fault`` (or CHALLENGE_FAULT) makes the challenge misbehave on purpose, for the
platform's fault tests: hang, crash, error, nan, inf, negative, bad-ss58, duplicate,
bad-label, huge[:N], slow:SECONDS, unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from challenge_shim.sdk import Challenge, HealthReport, HealthState, Weights, WeightsRequest
from platform_common import logs
from platform_common.config import join_host_port, parse_host_port
from platform_network.v1 import challenge_pb2

log = logging.getLogger("sum_bench")

HOTKEY_HEADER = "X-Platform-Verified-Hotkey"
SCORING_VERSION = "sum-v1"
TASK_SIZE = 5
FAULTS = (
    "hang",
    "crash",
    "error",
    "nan",
    "inf",
    "negative",
    "bad-ss58",
    "duplicate",
    "bad-label",
    "huge",
    "slow",
    "unhealthy",
)
# //Alice's hotkey, and the same address with its last character changed (bad checksum).
FAULT_HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
BAD_HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQZ"
HUGE_DEFAULT = 1_000_000


def task_numbers(task_id: int) -> list[int]:
    """The numbers of task ``task_id``: a fixed linear congruential sequence."""
    state = task_id
    numbers = []
    for _ in range(TASK_SIZE):
        state = (state * 1_103_515_245 + 12_345) % 2**31
        numbers.append(state % 1000)
    return numbers


class Scoreboard:
    """Points per hotkey: one per distinct task solved. In memory, as the contract
    advises (answer GetWeights from memory rather than compute on the call)."""

    def __init__(self) -> None:
        self.solved: dict[str, set[int]] = {}

    def submit(self, hotkey: str, task_id: int, answer: int) -> bool:
        correct = answer == sum(task_numbers(task_id))
        if correct:
            self.solved.setdefault(hotkey, set()).add(task_id)
        return correct

    def scores(self) -> dict[str, float]:
        return {hotkey: float(len(tasks)) for hotkey, tasks in sorted(self.solved.items())}


def parse_fault(text: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:ARG`` -> (name, arg); refuses unknown names."""
    name, _, arg = text.partition(":")
    if name and name not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
    return name, arg


def huge_answer(count: int) -> challenge_pb2.GetWeightsResponse:
    """``count`` copies of one entry (placeholder hotkey, score 1.0), built from the wire
    encoding: the size rule refuses such an answer before hotkeys are even looked at."""
    hotkey = b"5" * 48
    # entries (field 1) of 59 bytes: hotkey (field 1, 48 bytes) + score (field 2, double).
    entry = b"\x0a\x3b\x0a\x30" + hotkey + b"\x11" + struct.pack("<d", 1.0)
    return challenge_pb2.GetWeightsResponse.FromString(entry * count)


def build_challenge(board: Scoreboard, fault: tuple[str, str]) -> Challenge:
    """The SDK challenge over ``board``, misbehaving as ``fault`` says."""
    name, arg = fault
    challenge = Challenge(
        name="sum-bench",
        version="1.0.0",
        public_http=True,
        metadata={"task_size": TASK_SIZE},
    )
    huge_cache: list[challenge_pb2.GetWeightsResponse] = []

    @challenge.weights
    async def weights(request: WeightsRequest) -> Any:
        log.info("weights asked", extra={"epoch": request.epoch, "fault": name or None})
        scores = board.scores()
        if name == "hang":
            await asyncio.Event().wait()
        if name == "slow":
            await asyncio.sleep(float(arg or 5))
        if name == "crash":
            os._exit(3)
        if name == "error":
            raise RuntimeError("scores are being recomputed")
        if name in ("nan", "inf", "negative"):
            scores[FAULT_HOTKEY] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[
                name
            ]
        if name == "bad-ss58":
            scores[BAD_HOTKEY] = 1.0
        if name == "bad-label":
            return Weights(scores, scoring_version="x" * 200)
        if name == "duplicate":
            entries = [(FAULT_HOTKEY, 1.0), *scores.items(), (FAULT_HOTKEY, 2.0)]
            return challenge_pb2.GetWeightsResponse(
                entries=[challenge_pb2.WeightEntry(hotkey=h, score=s) for h, s in entries]
            )
        if name == "huge":
            if not huge_cache:
                huge_cache.append(huge_answer(int(arg or HUGE_DEFAULT)))
            return huge_cache[0]
        return Weights(scores, scoring_version=SCORING_VERSION)

    @challenge.health
    def health() -> HealthReport:
        if name == "unhealthy":
            return HealthReport(HealthState.NOT_SERVING, "fault injected: unhealthy")
        return HealthReport(HealthState.SERVING)

    @challenge.info
    def info() -> dict[str, int]:
        return {"miners": len(board.solved)}

    return challenge


def public_app(board: Scoreboard) -> web.Application:
    """The miners' HTTP API."""

    async def task(request: web.Request) -> web.Response:
        try:
            task_id = int(request.query.get("id", "1"))
        except ValueError:
            return web.json_response({"error": "id: must be an integer"}, status=400)
        return web.json_response({"task_id": task_id, "numbers": task_numbers(task_id)})

    async def submit(request: web.Request) -> web.Response:
        hotkey = request.headers.get(HOTKEY_HEADER, "")
        if not hotkey:
            return web.json_response({"error": f"missing {HOTKEY_HEADER}"}, status=401)
        try:
            body = await request.json()
            task_id, answer = int(body["task_id"]), int(body["answer"])
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": 'body: expected {"task_id": <int>, "answer": <int>}'}, status=400
            )
        correct = board.submit(hotkey, task_id, answer)
        return web.json_response({"correct": correct, "score": board.scores().get(hotkey, 0.0)})

    async def leaderboard(request: web.Request) -> web.Response:
        ranked = sorted(board.scores().items(), key=lambda item: (-item[1], item[0]))
        return web.json_response([{"hotkey": h, "score": s} for h, s in ranked])

    app = web.Application()
    app.router.add_get("/task", task)
    app.router.add_post("/submit", submit)
    app.router.add_get("/leaderboard", leaderboard)
    return app


def write_ready_file(path: str, addresses: dict[str, str]) -> None:
    """Write the bound addresses atomically, for whoever started this process."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(addresses))
    tmp.replace(path)


async def main_async(args: argparse.Namespace) -> None:
    from challenge_shim.sdk import wait_for_signal

    board = Scoreboard()
    challenge = build_challenge(board, args.fault)
    internal = await challenge.start(args.internal, token=os.environ.get("CHALLENGE_TOKEN"))
    runner = web.AppRunner(public_app(board), access_log=None, shutdown_timeout=5)
    await runner.setup()
    host, port = parse_host_port(args.public, "--public")
    site = web.TCPSite(runner, host, port)
    await site.start()
    public_port = runner.addresses[0][1]
    ready = {"internal": internal.address, "public": join_host_port(host, public_port)}
    log.info("sum-bench ready", extra=ready)
    if args.ready_file:
        write_ready_file(args.ready_file, ready)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()
        await internal.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--internal",
        default="127.0.0.1:50070",
        metavar="HOST:PORT",
        help="ChallengeInternal gRPC address (the shim's --challenge-address)",
    )
    parser.add_argument(
        "--public", default="127.0.0.1:8080", metavar="HOST:PORT", help="public HTTP API for miners"
    )
    parser.add_argument(
        "--ready-file",
        default="",
        metavar="PATH",
        help='write {"internal": ..., "public": ...} here once serving',
    )
    parser.add_argument(
        "--fault",
        type=parse_fault,
        default=parse_fault(os.environ.get("CHALLENGE_FAULT", "")),
        metavar="NAME[:ARG]",
        help=f"misbehave on purpose: {', '.join(FAULTS)}",
    )
    args = parser.parse_args()
    logs.configure("sum-bench", "info", "json")
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
