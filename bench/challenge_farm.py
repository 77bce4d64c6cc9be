"""Many SDK challenges in one process, for the epoch benchmark.

Each challenge listens on its own port and answers GetWeights after ``--delay``
seconds with a score for each of ``--hotkeys`` dev hotkeys (uids 0..N-1 of the
local subnet). Writes ``{"addresses": [...]}`` to ``--ready-file`` once serving
and runs until SIGTERM.

    python -m bench.challenge_farm --count 64 --hotkeys 256 --delay 0.1 --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
from pathlib import Path

from challenge_shim.sdk import Challenge, RunningChallenge, Weights
from platform_common.chain import dev_keypair


def build(index: int, hotkeys: list[str], delay: float) -> Challenge:
    rng = random.Random(index)
    scores = {hotkey: rng.uniform(0.0, 100.0) for hotkey in hotkeys}
    challenge = Challenge(name=f"farm-{index}", version="1.0.0")

    @challenge.weights
    async def weights() -> Weights:
        await asyncio.sleep(delay)
        return Weights(scores, scoring_version="farm")

    return challenge


async def main(args: argparse.Namespace) -> None:
    hotkeys = [dev_keypair("hotkey", uid).ss58_address for uid in range(args.hotkeys)]
    running: list[RunningChallenge] = []
    for index in range(args.count):
        running.append(await build(index, hotkeys, args.delay).start("127.0.0.1:0", grace=0.5))
    ready = Path(args.ready_file)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"addresses": [r.address for r in running]}))
    tmp.replace(ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(r.stop() for r in running))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--hotkeys", type=int, default=256)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--ready-file", required=True)
    asyncio.run(main(parser.parse_args()))
