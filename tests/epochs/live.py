"""Real challenges for epoch tests: example processes behind real ``platform shim`` processes."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from platform_network.v1 import registry_pb2
from tests.helpers import ACTIVE, set_status, spec
from tests.shim.support import EXAMPLES, Process
from tests.shim.support import shim as shim_process
from tests.support.master import ADMIN

HOTKEY_HEADER = "X-Platform-Verified-Hotkey"


@dataclass
class LiveChallenge:
    slug: str
    token: str
    processes: list[Process] = field(default_factory=list)
    shim_address: str = ""
    public_url: str = ""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    async def solve(self, hotkey: str, tasks: int, first_task: int = 1) -> None:
        """Solve ``tasks`` tasks through the public API as miner ``hotkey``."""
        async with aiohttp.ClientSession(base_url=self.public_url) as http:
            for task_id in range(first_task, first_task + tasks):
                async with http.get("/task", params={"id": str(task_id)}) as answer:
                    task = await answer.json()
                body = {"task_id": task_id, "answer": sum(task["numbers"])}
                async with http.post(
                    "/submit", json=body, headers={HOTKEY_HEADER: hotkey}
                ) as answer:
                    assert answer.status == 200, await answer.text()


async def register(registry: object, slug: str, share: float) -> str:
    """Create and activate ``slug``; return its token."""
    created = await registry.CreateChallenge(  # type: ignore[attr-defined]
        registry_pb2.CreateChallengeRequest(challenge=spec(slug, share=share)), metadata=ADMIN
    )
    await set_status(registry, slug, ACTIVE)  # type: ignore[arg-type]
    return str(created.token)


def launch(
    workdir: Path,
    slug: str,
    token: str,
    *,
    kind: str = "native",
    fault: str = "",
    shim_token: str | None = None,
    with_shim: bool = True,
) -> LiveChallenge:
    """Start one example challenge and its shim; the shim checks ``shim_token`` (default: token)."""
    live = LiveChallenge(slug, token)
    env = {"CHALLENGE_TOKEN": token}
    if kind == "native":
        argv = [
            sys.executable,
            str(EXAMPLES / "native" / "challenge.py"),
            "--internal",
            "127.0.0.1:0",
            "--public",
            "127.0.0.1:0",
        ]
    else:
        argv = [
            sys.executable,
            str(EXAMPLES / "http" / "challenge.py"),
            "--listen",
            "127.0.0.1:0",
            "--slug",
            slug,
        ]
    if fault:
        argv += ["--fault", fault]
    challenge = Process(f"{slug}-challenge", argv, workdir, env)
    live.processes.append(challenge)
    ready = challenge.start()
    internal = ready.get("internal") or ready.get("listen")
    public = ready.get("public") or ready.get("listen")
    live.public_url = f"http://{public}"
    if not with_shim:
        # The master talks to the challenge itself: nothing checks the answer but the master.
        live.shim_address = str(internal)
        return live
    shim = shim_process(
        workdir,
        str(internal),
        name=f"{slug}-shim",
        transport="grpc" if kind == "native" else "http",
        slug=slug,
        token=shim_token or token,
    )
    live.processes.append(shim)
    live.shim_address = str(shim.start()["listen"])
    return live


def write_endpoints(path: Path, challenges: list[LiveChallenge]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({c.slug: c.shim_address for c in challenges}))
    tmp.replace(path)
