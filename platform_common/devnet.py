"""``platform dev``: the platform on embedded defaults, for a developer's terminal.

Starts the master on SQLite under ``.dev/`` with a generated admin token and the
Envoy edge (a real Envoy the master starts and configures), prints where they
listen and how to reach them, then shows registry changes
live (through WatchRegistry, as any watcher would) until Ctrl-C, when it stops
every process it started and waits for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from platform_network.v1 import registry_pb2, registry_pb2_grpc

STATE_DIR = Path(".dev")
DEMO_SPEC = (
    '{"challenge": {"slug": "demo", "name": "Demo", '
    '"image": "ghcr.io/example/demo:1.0", "emission_share": 0.5}}'
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="run the platform locally on embedded defaults (SQLite, generated token)",
        description="Run the platform locally: the master on SQLite with a generated admin "
        "token, state under .dev/. Ctrl-C stops everything.",
    )
    parser.add_argument(
        "--state-dir", default=str(STATE_DIR), help="where state and logs go (default: .dev)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PLATFORM_DEV_PORT", "50051")),
        help="master gRPC port (env PLATFORM_DEV_PORT; default 50051)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("PLATFORM_DEV_METRICS_PORT", "9464")),
        help="master metrics port (env PLATFORM_DEV_METRICS_PORT; default 9464)",
    )
    parser.add_argument(
        "--edge-port",
        type=int,
        default=int(os.environ.get("PLATFORM_DEV_EDGE_PORT", "8080")),
        help="public port of the Envoy edge (env PLATFORM_DEV_EDGE_PORT; default 8080)",
    )
    parser.add_argument(
        "--edge-admin-port",
        type=int,
        default=int(os.environ.get("PLATFORM_DEV_EDGE_ADMIN_PORT", "9901")),
        help="admin port of the Envoy edge (env PLATFORM_DEV_EDGE_ADMIN_PORT; default 9901)",
    )
    parser.add_argument("--exit-after", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    token = _admin_token(state / "admin-token")
    ready = state / "master.addr"
    ready.unlink(missing_ok=True)
    log_path = state / "master.log"
    platform = shutil.which("platform", path=str(Path(sys.executable).parent)) or "platform"
    master = subprocess.Popen(
        [
            platform,
            "master",
            "--listen",
            f"127.0.0.1:{args.port}",
            "--database-url",
            f"sqlite+aiosqlite:///{state / 'master.db'}",
            "--admin-token-file",
            str(state / "admin-token"),
            "--metrics-listen",
            f"127.0.0.1:{args.metrics_port}",
            "--ready-file",
            str(ready),
            "--log-format",
            "text",
            "--edge-listen",
            f"127.0.0.1:{args.edge_port}",
            "--edge-envoy",
            "--edge-admin-listen",
            f"127.0.0.1:{args.edge_admin_port}",
            "--edge-envoy-dir",
            str(state / "envoy"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("ab"),
    )
    try:
        address = _wait_ready(master, ready, log_path)
        found = re.search(r"metrics_port=(\d+)", log_path.read_text(errors="replace"))
        _banner(
            address,
            int(found.group(1)) if found else args.metrics_port,
            args.edge_port,
            state,
            log_path,
        )
        asyncio.run(_live_view(address, token, args.exit_after))
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"platform dev: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(master)
    return 0


def _admin_token(path: Path) -> str:
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _wait_ready(master: subprocess.Popen[bytes], ready: Path, log_path: Path) -> str:
    deadline = time.monotonic() + 60
    while not ready.exists():
        if master.poll() is not None:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise RuntimeError(
                f"the master exited with {master.returncode}; last log lines:\n{tail}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the master did not start within 60 s; see {log_path}")
        time.sleep(0.05)
    return ready.read_text().strip()


def _banner(address: str, metrics_port: int, edge_port: int, state: Path, log_path: Path) -> None:
    envoy_log = state / "envoy" / "envoy.log"
    grpcurl = os.path.relpath(Path(sys.executable).parent / "grpcurl")
    if grpcurl.startswith(".."):
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
    print(
        f"""
Platform is running (Ctrl-C stops it)

  master    {address}   gRPC with reflection; log: {log_path}
  edge      http://127.0.0.1:{edge_port}/challenges/{{slug}}/   Envoy; log: {envoy_log}
  metrics   http://127.0.0.1:{metrics_port}/metrics
  database  {state / "master.db"} (SQLite)

Reach it with grpcurl:

  export PLATFORM_ADMIN_TOKEN=$(cat {state / "admin-token"})
  {grpcurl} -plaintext {address} list
  {grpcurl} -plaintext -H "authorization: Bearer $PLATFORM_ADMIN_TOKEN" \\
      -d '{DEMO_SPEC}' \\
      {address} platform_network.v1.Registry/CreateChallenge

Registry changes appear below as they happen.
""",
        flush=True,
    )


async def _live_view(address: str, token: str, exit_after: float) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    revision, history = 0, ""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        while not exit_after or time.monotonic() - started < exit_after:
            call = stub.WatchRegistry(
                registry_pb2.WatchRegistryRequest(since_revision=revision, history_id=history),
                metadata=metadata,
                timeout=exit_after or None,
            )
            try:
                async for message in call:
                    revision, history = message.cursor.revision, message.cursor.history_id
                    _show(message)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return
                print(f"  (watch interrupted: {error.code().name}; reconnecting)", flush=True)
                await asyncio.sleep(1)


def _show(message: registry_pb2.WatchRegistryResponse) -> None:
    stamp = time.strftime("%H:%M:%S")
    kind = message.WhichOneof("payload")
    if kind == "snapshot":
        names = ", ".join(c.slug for c in message.snapshot.challenges) or "no challenges yet"
        print(f"  {stamp}  revision {message.cursor.revision}: {names}", flush=True)
    elif kind == "event":
        event = message.event
        c = event.challenge
        verb = "deleted" if event.type == registry_pb2.RegistryEvent.TYPE_DELETE else "now"
        status = registry_pb2.ChallengeStatus.Name(c.status).removeprefix("CHALLENGE_STATUS_")
        print(
            f"  {stamp}  revision {event.revision}: {c.slug} {verb} {status}, "
            f"share {c.emission_share:g}",
            flush=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print("Stopped.", flush=True)
