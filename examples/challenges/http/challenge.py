"""Sum Bench, HTTP flavour: a sample challenge that speaks only the reference platform's
HTTP contract (no SDK, no gRPC: aiohttp and the standard library). The shim runs in
front of it with ``--transport http`` and translates.

Run from the repository root (port 0 picks a free one; see --ready-file)::

    CHALLENGE_TOKEN=dev-challenge-token-0123456789 \\
        python examples/challenges/http/challenge.py --listen 127.0.0.1:8081 --slug sum-bench-http

One HTTP server holds both parts, as in the reference platform (the edge refuses
/internal, /health and /version from the outside):

* the platform's: ``GET /internal/v1/get_weights`` (``Authorization: Bearer <token>``
  -> 401 otherwise; ``X-Platform-Challenge-Slug: <slug>`` -> 403 otherwise) answering
  ``{"weights": {"<hotkey>": <score>}, "scoring_version": "sum-v1"}``, ``GET /health``,
  ``GET /version``;
* the miners': ``GET /task?id=N``, ``POST /submit`` ``{"task_id": N, "answer": <sum>}``
  with ``X-Platform-Verified-Hotkey`` (set by the edge; set it yourself in dev),
  ``GET /leaderboard``.

``--fault`` (or CHALLENGE_FAULT) makes it misbehave on purpose, for the platform's
fault tests: hang, crash, error, nan, inf, negative, bad-ss58, duplicate, bad-label,
huge[:N], slow:SECONDS, unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

log = logging.getLogger("sum_bench_http")

HOTKEY_HEADER = "X-Platform-Verified-Hotkey"
SLUG_HEADER = "X-Platform-Challenge-Slug"
VERSION = "1.0.0"
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


def parse_fault(text: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:ARG`` -> (name, arg); refuses unknown names."""
    name, _, arg = text.partition(":")
    if name and name not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
    return name, arg


class SumBench:
    """Scores in memory (one point per distinct task solved) and the HTTP handlers."""

    def __init__(self, token: str, slug: str, fault: tuple[str, str]) -> None:
        self.token = token
        self.slug = slug
        self.fault, self.fault_arg = fault
        self.solved: dict[str, set[int]] = {}
        self._huge_body: bytes | None = None

    def scores(self) -> dict[str, float]:
        return {hotkey: float(len(tasks)) for hotkey, tasks in sorted(self.solved.items())}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/internal/v1/get_weights", self.get_weights)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/task", self.task)
        app.router.add_post("/submit", self.submit)
        app.router.add_get("/leaderboard", self.leaderboard)
        return app

    # --- the platform's routes ---------------------------------------------------

    async def get_weights(self, request: web.Request) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {self.token}".encode()):
            return web.json_response({"error": "invalid internal token"}, status=401)
        if request.headers.get(SLUG_HEADER) != self.slug:
            return web.json_response({"error": f"{SLUG_HEADER} must be {self.slug}"}, status=403)
        log.info("weights asked", extra={"epoch": request.query.get("epoch")})
        fault, arg = self.fault, self.fault_arg
        scores = self.scores()
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "slow":
            await asyncio.sleep(float(arg or 5))
        if fault == "crash":
            os._exit(3)
        if fault == "error":
            return web.Response(status=500, text="scores are being recomputed")
        if fault == "huge":
            return web.Response(
                body=self._huge(int(arg or HUGE_DEFAULT)), content_type="application/json"
            )
        if fault in ("nan", "inf", "negative"):
            scores[FAULT_HOTKEY] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[
                fault
            ]
        if fault == "bad-ss58":
            scores[BAD_HOTKEY] = 1.0
        label = "x" * 200 if fault == "bad-label" else SCORING_VERSION
        # Python's json writes NaN and Infinity literals (not JSON), as careless servers do.
        text = json.dumps({"weights": scores, "scoring_version": label})
        if fault == "duplicate":
            # The same key twice, which a dict-based parser would silently collapse.
            members = [
                f'"{FAULT_HOTKEY}": 1.0',
                *(f'"{h}": {s}' for h, s in scores.items()),
                f'"{FAULT_HOTKEY}": 2.0',
            ]
            text = '{"weights": {' + ", ".join(members) + "}}"
        return web.Response(text=text, content_type="application/json")

    def _huge(self, count: int) -> bytes:
        if self._huge_body is None:
            member = b'"' + b"5" * 48 + b'": 1.0'
            self._huge_body = b'{"weights": {' + b", ".join([member] * count) + b"}}"
        return self._huge_body

    async def health(self, request: web.Request) -> web.Response:
        if self.fault == "unhealthy":
            return web.json_response({"ok": False, "error": "fault injected"}, status=503)
        return web.json_response({"ok": True})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"slug": self.slug, "version": VERSION, "contract": 1})

    # --- the miners' routes ------------------------------------------------------

    async def task(self, request: web.Request) -> web.Response:
        try:
            task_id = int(request.query.get("id", "1"))
        except ValueError:
            return web.json_response({"error": "id: must be an integer"}, status=400)
        return web.json_response({"task_id": task_id, "numbers": task_numbers(task_id)})

    async def submit(self, request: web.Request) -> web.Response:
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
        correct = answer == sum(task_numbers(task_id))
        if correct:
            self.solved.setdefault(hotkey, set()).add(task_id)
        return web.json_response({"correct": correct, "score": self.scores().get(hotkey, 0.0)})

    async def leaderboard(self, request: web.Request) -> web.Response:
        ranked = sorted(self.scores().items(), key=lambda item: (-item[1], item[0]))
        return web.json_response([{"hotkey": h, "score": s} for h, s in ranked])


def write_ready_file(path: str, addresses: dict[str, str]) -> None:
    """Write the bound addresses atomically, for whoever started this process."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(addresses))
    tmp.replace(path)


async def main_async(args: argparse.Namespace, token: str) -> None:
    bench = SumBench(token, args.slug, args.fault)
    runner = web.AppRunner(bench.app(), access_log=None, shutdown_timeout=5)
    await runner.setup()
    host, _, port = args.listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    bound = runner.addresses[0][1]
    address = f"[{host.strip('[]')}]:{bound}" if ":" in host else f"{host}:{bound}"
    log.info("sum-bench-http ready on %s", address)
    if args.ready_file:
        write_ready_file(args.ready_file, {"listen": address})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8081",
        metavar="HOST:PORT",
        help="HTTP address (internal and public routes)",
    )
    parser.add_argument(
        "--slug", default="sum-bench-http", help=f"the slug the platform sends in {SLUG_HEADER}"
    )
    parser.add_argument(
        "--ready-file", default="", metavar="PATH", help='write {"listen": ...} here once serving'
    )
    parser.add_argument(
        "--fault",
        type=parse_fault,
        default=parse_fault(os.environ.get("CHALLENGE_FAULT", "")),
        metavar="NAME[:ARG]",
        help=f"misbehave on purpose: {', '.join(FAULTS)}",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    token = os.environ.get("CHALLENGE_TOKEN", "")
    if not token:
        parser.error("set CHALLENGE_TOKEN: the token the platform presents on internal routes")
    asyncio.run(main_async(args, token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
