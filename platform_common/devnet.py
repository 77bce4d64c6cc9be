"""``platform dev``: a whole subnet on one machine, for a developer's terminal.

Starts, under ``.dev/``: a local simulated chain (``platform chain``: 32 neurons, 4
validator permits, one block per second), the master on SQLite with the local runtime
(the two example challenges and their shims as supervised processes) and the Envoy
edge, then registers and activates the example challenges, starts the validator
agents, prints where everything listens, and shows a compact live view: registry
changes, each sealed epoch with its per-challenge status and vector, and what the
validators put on chain. Ctrl-C stops every process it started, in reverse order,
and waits for each.
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
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from platform_common.files import write_atomically
from platform_common.ports import free_port
from platform_common.runtime import images
from platform_common.runtime.interface import RuntimeBusy
from platform_common.runtime.local import LocalRuntime, recorded_slugs
from platform_network.v1 import registry_pb2, registry_pb2_grpc, weights_pb2, weights_pb2_grpc

STATE_DIR = Path(".dev")
REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "images.json"
MASTER_KEY = "//platform-dev/master/0"
# Each stops the whole local subnet (see _stop_on_signals).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
VALIDATOR_KEY = "//platform-dev/hotkey/{uid}"
DEMO_SPEC = (
    '{"challenge": {"slug": "demo", "name": "Demo", '
    '"image": "ghcr.io/example/demo:1.0", "emission_share": 0.1}}'
)
EXAMPLES = (
    # slug, image, share: both sample challenges, each with a signed /submit.
    ("native", "ghcr.io/platform-network/example-native:dev", 0.45),
    ("http", "ghcr.io/platform-network/example-http:dev", 0.45),
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="run a whole subnet locally: chain, master, edge, challenges, validators",
        description="Run a whole subnet locally, state under .dev/: a simulated chain, the "
        "master on SQLite with the local runtime and the Envoy edge, the two example "
        "challenges, validator agents. Ctrl-C stops everything.",
    )
    parser.add_argument(
        "--state-dir", default=str(STATE_DIR), help="where state and logs go (default: .dev)"
    )
    for name, env, default, what in (
        ("port", "PLATFORM_DEV_PORT", 50051, "master gRPC port"),
        ("metrics-port", "PLATFORM_DEV_METRICS_PORT", 9464, "master metrics port"),
        ("edge-port", "PLATFORM_DEV_EDGE_PORT", 8080, "public port of the Envoy edge"),
        ("edge-admin-port", "PLATFORM_DEV_EDGE_ADMIN_PORT", 9901, "admin port of the edge"),
        ("chain-port", "PLATFORM_DEV_CHAIN_PORT", 9945, "port of the simulated chain"),
    ):
        parser.add_argument(
            f"--{name}",
            type=int,
            default=int(os.environ.get(env, str(default))),
            help=f"{what} (env {env}; default {default}; 0 picks a free port)",
        )
    parser.add_argument(
        "--validators", type=int, default=2, help="validator agents to run (default 2, at most 4)"
    )
    parser.add_argument(
        "--no-examples", action="store_true", help="do not register the example challenges"
    )
    parser.add_argument("--exit-after", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


@dataclass
class Child:
    """One process of the subnet: started with a ready file, stopped by PID."""

    name: str
    argv: list[str]
    log: Path
    ready: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            env={**os.environ, **self.env},
        )

    def wait_ready(self, timeout: float = 90.0) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            self.raise_if_exited()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not start within {timeout:g} s; see {self.log}"
                )
            time.sleep(0.05)
        return self.ready.read_text().strip()

    def raise_if_exited(self) -> None:
        """Raise :class:`RuntimeError` with the last log lines once the process has exited
        (reaping it)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; last log lines:\n" + self.tail()
            )

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(args: argparse.Namespace) -> int:
    # The master, the chain, the metrics server and Envoy's admin report the port they
    # bound; the edge's public port is only known if chosen here.
    if args.edge_port == 0:
        args.edge_port = free_port()
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    token = _secret(state / "admin-token", secrets.token_urlsafe(32))
    _secret(state / "token.key", secrets.token_hex(32))
    platform = shutil.which("platform", path=str(Path(sys.executable).parent)) or "platform"
    children: list[Child] = []
    _stop_on_signals()
    try:
        chain = _chain(platform, state, logs, args)
        children.append(chain)
        chain.start()
        chain_address = chain.wait_ready()
        master = _master(platform, state=state, logs=logs, args=args, chain_address=chain_address)
        children.append(master)
        master.start()
        address = master.wait_ready()
        master_hotkey = _ss58(MASTER_KEY)
        if not args.no_examples:
            _run_stoppable(_register_examples(address, token))
        for uid in range(max(0, min(args.validators, 4))):
            validator = _validator(
                platform,
                state=state,
                logs=logs,
                uid=uid,
                master=address,
                chain_address=chain_address,
                master_hotkey=master_hotkey,
            )
            children.append(validator)
            validator.start()
        for child in children[2:]:
            child.wait_ready()
        found = re.search(r"metrics_port=(\d+)", master.log.read_text(errors="replace"))
        _banner(
            address,
            metrics_port=int(found.group(1)) if found else args.metrics_port,
            chain_address=chain_address,
            args=args,
            state=state,
            logs=logs,
            children=children,
        )
        _run_stoppable(_live_view(address, token, args.exit_after, children))
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"platform dev: {exc}", file=sys.stderr)
        return 1
    finally:
        # The stop below is bounded (each child: SIGTERM, then SIGKILL after 30 s); a
        # second signal must not cut it short and leave processes behind.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        left = _stop_left_challenges(state / "runtime")
        if left:
            print(f"Stopped the challenge instances the master left: {', '.join(left)}.")
        print("Stopped.", flush=True)
    return 0


def _stop_on_signals() -> None:
    """SIGTERM (``kill``, a supervisor) and SIGHUP (a closed terminal) stop the platform as
    Ctrl-C does: a :class:`KeyboardInterrupt`, then the stop in :func:`run`'s ``finally``.
    Without this they would end this process at once and leave the chain, the master and
    the validators running. SIGINT is taken back from a shell that ignores it (a script's
    background job), for the same reason. These handlers stand between the event loops;
    while one runs, :func:`_run_stoppable` takes the signals over."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in STOP_SIGNALS:
        handler = signal.default_int_handler if signum == signal.SIGINT else interrupt
        signal.signal(signum, handler)


def _run_stoppable(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on a new event loop; a stop signal cancels it, and once it has unwound
    (its gRPC channel closed) :class:`KeyboardInterrupt` is raised here.

    This is how asyncio stops a program on Ctrl-C, extended to every signal in
    :data:`STOP_SIGNALS`. The handlers of :func:`_stop_on_signals` raise
    :class:`KeyboardInterrupt` wherever the main thread happens to be, which is safe in the
    synchronous steps between these loops but not inside one: there it can land in
    grpc.aio's completion callbacks, which swallow it half done, and the process then
    hangs closing the channel or aborts at exit with a corrupted heap."""
    if asyncio.run(_until_stopped(main)):
        raise KeyboardInterrupt


async def _until_stopped(main: Coroutine[Any, Any, None]) -> bool:
    """Await ``main``, cancelled by the first stop signal; whether a signal stopped it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:  # a second signal must not cut the unwinding short
            stopped = True
            task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop)
    try:
        await main
    except asyncio.CancelledError:
        if not stopped:
            raise
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)  # which leaves the default disposition
        _stop_on_signals()
    return stopped


def _stop_left_challenges(runtime_dir: Path) -> list[str]:
    """Stop the challenge instances a master left in its runtime directory; their slugs.

    A master that stops cleanly stops its challenges and removes their records, so there
    is nothing to do. One that died could not: its local runtime starts challenges without
    a parent-death signal, so that a master restarted on the same state adopts them. Here
    the whole subnet is going away, so nothing will adopt them; the runtime, opened on the
    dead master's directory with nothing desired, stops every recorded instance."""
    slugs = recorded_slugs(runtime_dir)
    if not slugs:
        return []
    try:
        runtime = LocalRuntime(runtime_dir, images.load(IMAGES))
    except RuntimeBusy:
        return []  # the master still holds it: it is alive, and stops them itself
    asyncio.run(_stop_all(runtime))
    return slugs


async def _stop_all(runtime: LocalRuntime) -> None:
    try:
        await runtime.adopt(())
    finally:
        await runtime.close()


def _secret(path: Path, value: str) -> str:
    if not path.exists():
        write_atomically(path, value + "\n", private=True)
    return path.read_text().strip()


def _ss58(uri: str) -> str:
    from platform_common.keys import load_signer

    return load_signer(uri).ss58_address


def _port(port: int) -> str:
    return f"127.0.0.1:{port}"


def _chain(platform: str, state: Path, logs: Path, args: argparse.Namespace) -> Child:
    return Child(
        "chain",
        [
            platform,
            "chain",
            "--state",
            str(state / "chain.json"),
            "--listen",
            _port(args.chain_port),
            "--neurons",
            "32",
            "--validators",
            "4",
            "--block-time",
            "1",
            "--tempo",
            "20",
            "--weights-rate-limit",
            "10",
            "--ready-file",
            str(state / "chain.addr"),
            "--log-format",
            "text",
        ],
        logs / "chain.log",
        state / "chain.addr",
    )


def _master(
    platform: str,
    *,
    state: Path,
    logs: Path,
    args: argparse.Namespace,
    chain_address: str,
) -> Child:
    return Child(
        "master",
        [
            platform,
            "master",
            "--listen",
            _port(args.port),
            "--database-url",
            f"sqlite+aiosqlite:///{state / 'master.db'}",
            "--admin-token-file",
            str(state / "admin-token"),
            "--metrics-listen",
            _port(args.metrics_port),
            "--ready-file",
            str(state / "master.addr"),
            "--log-format",
            "text",
            "--token-key-file",
            str(state / "token.key"),
            "--chain",
            f"local+http://{chain_address}",
            "--epoch-schedule",
            "tempo",
            "--epoch-lead-blocks",
            "5",
            "--block-time",
            "1",
            "--collect-timeout",
            "5",
            "--runtime",
            "local",
            "--runtime-images",
            str(IMAGES),
            "--runtime-dir",
            str(state / "runtime"),
            "--edge-listen",
            _port(args.edge_port),
            "--edge-envoy",
            "--edge-admin-listen",
            _port(args.edge_admin_port),
            "--edge-envoy-dir",
            str(state / "envoy"),
        ],
        logs / "master.log",
        state / "master.addr",
        env={"PLATFORM_HOTKEY": MASTER_KEY, "PLATFORM_ADMIN_TOKEN": ""},
    )


def _validator(
    platform: str,
    *,
    state: Path,
    logs: Path,
    uid: int,
    master: str,
    chain_address: str,
    master_hotkey: str,
) -> Child:
    return Child(
        f"validator-{uid}",
        [
            platform,
            "validator",
            "--master",
            master,
            "--master-hotkey",
            master_hotkey,
            "--chain",
            f"local+http://{chain_address}",
            "--database-url",
            f"sqlite+aiosqlite:///{state / f'validator-{uid}.db'}",
            "--metrics-listen",
            "127.0.0.1:0",
            "--ready-file",
            str(state / f"validator-{uid}.addr"),
            "--log-format",
            "text",
        ],
        logs / f"validator-{uid}.log",
        state / f"validator-{uid}.addr",
        env={"PLATFORM_HOTKEY": VALIDATOR_KEY.format(uid=uid)},
    )


async def _register_examples(address: str, token: str) -> None:
    """Create and activate the example challenges (kept as they are when they exist)."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        existing = await stub.ListChallenges(
            registry_pb2.ListChallengesRequest(), metadata=metadata
        )
        known = {c.slug: c for c in existing.challenges}
        for slug, image, share in EXAMPLES:
            if slug not in known:
                await stub.CreateChallenge(
                    registry_pb2.CreateChallengeRequest(
                        challenge=registry_pb2.ChallengeSpec(
                            slug=slug,
                            name=f"Example ({slug})",
                            image=image,
                            emission_share=share,
                            routes=registry_pb2.PublicRoutes(
                                public_port=8000, signed_path_prefixes=["/submit"]
                            ),
                        )
                    ),
                    metadata=metadata,
                )
            if slug not in known or known[slug].status != registry_pb2.CHALLENGE_STATUS_ACTIVE:
                await stub.SetChallengeStatus(
                    registry_pb2.SetChallengeStatusRequest(
                        slug=slug, status=registry_pb2.CHALLENGE_STATUS_ACTIVE
                    ),
                    metadata=metadata,
                )


def _banner(
    address: str,
    *,
    metrics_port: int,
    chain_address: str,
    args: argparse.Namespace,
    state: Path,
    logs: Path,
    children: list[Child],
) -> None:
    bin_dir = Path(sys.executable).parent
    grpcurl = os.path.relpath(bin_dir / "grpcurl")
    if grpcurl.startswith(".."):
        grpcurl = str(bin_dir / "grpcurl")
    platform = os.path.relpath(bin_dir / "platform")
    if platform.startswith(".."):
        platform = str(bin_dir / "platform")
    edge = _port(args.edge_port)
    validators = [c for c in children if c.name.startswith("validator-")]
    print(
        f"""
Platform is running: a whole subnet on this machine (Ctrl-C stops it)

  chain       http://{chain_address}   simulated subnet 1: 32 neurons, 4 validator permits
  master      {address}   gRPC with reflection; log: {logs / "master.log"}
  edge        http://{edge}/challenges/{{slug}}/   Envoy; log: {state / "envoy" / "envoy.log"}
  metrics     http://127.0.0.1:{metrics_port}/metrics
  challenges  native, http   local runtime; logs: {state / "runtime" / "challenges"}/
  validators  {len(validators)} agents (uids 0..{len(validators) - 1}); logs: {logs}/validator-*.log
  database    {state / "master.db"} (SQLite)

Reach it with grpcurl:

  export PLATFORM_ADMIN_TOKEN=$(cat {state / "admin-token"})
  {grpcurl} -plaintext {address} list
  {grpcurl} -plaintext -H "authorization: Bearer $PLATFORM_ADMIN_TOKEN" \\
      -d '{DEMO_SPEC}' \\
      {address} platform_network.v1.Registry/CreateChallenge

Play a miner (uid 5) through the edge:

  curl -s "http://{edge}/challenges/native/task?id=1"
  PLATFORM_MINER_HOTKEY=//platform-dev/hotkey/5 {platform} miner POST \\
      http://{edge}/challenges/native/submit --data '{{"task_id": 1, "answer": 0}}'

Registry changes, sealed epochs and submissions appear below as they happen.
""",
        flush=True,
    )


async def _live_view(address: str, token: str, exit_after: float, children: list[Child]) -> None:
    """Print the subnet's changes until ``exit_after`` seconds (0: until interrupted), or
    raise :class:`RuntimeError` as soon as one of ``children`` exits."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        tasks = [
            asyncio.create_task(_supervise(children)),
            asyncio.create_task(_watch_registry(channel, metadata)),
            asyncio.create_task(_watch_weights(channel, metadata)),
        ]
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=exit_after or None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _supervise(children: list[Child], interval: float = 0.5) -> None:
    """Raise once a child process exits (reaping it): a dead master or chain stops the
    subnet with its last log lines, instead of leaving the live view reconnecting."""
    while True:
        for child in children:
            child.raise_if_exited()
        await asyncio.sleep(interval)


async def _watch_registry(channel: grpc.aio.Channel, metadata: Any) -> None:
    stub = registry_pb2_grpc.RegistryStub(channel)
    revision, history = 0, ""
    while True:
        call = stub.WatchRegistry(
            registry_pb2.WatchRegistryRequest(since_revision=revision, history_id=history),
            metadata=metadata,
        )
        try:
            async for message in call:
                revision, history = message.cursor.revision, message.cursor.history_id
                _show_registry(message)
        except grpc.aio.AioRpcError as error:
            print(f"  (registry watch interrupted: {error.code().name}; reconnecting)", flush=True)
            await asyncio.sleep(1)


async def _watch_weights(channel: grpc.aio.Channel, metadata: Any) -> None:
    stub: Any = weights_pb2_grpc.WeightsStub(channel)
    revision, history = 0, ""
    reporter = asyncio.create_task(_show_submissions(stub, metadata))
    try:
        while True:
            call = stub.WatchWeights(
                weights_pb2.WatchWeightsRequest(since_epoch=revision, history_id=history),
                metadata=metadata,
            )
            try:
                async for message in call:
                    revision, history = message.cursor.revision, message.cursor.history_id
                    vector = _vector_of(message)
                    if vector is not None and vector.epoch:
                        epoch = await stub.GetEpoch(
                            weights_pb2.GetEpochRequest(epoch=vector.epoch), metadata=metadata
                        )
                        _show_epoch(epoch)
            except grpc.aio.AioRpcError as error:
                print(
                    f"  (weights watch interrupted: {error.code().name}; reconnecting)", flush=True
                )
                await asyncio.sleep(1)
    finally:
        reporter.cancel()


def _vector_of(message: Any) -> Any:
    kind = message.WhichOneof("payload")
    if kind == "vector":
        return message.vector
    if kind == "snapshot" and message.snapshot.HasField("latest"):
        return message.snapshot.latest
    return None


async def _show_submissions(stub: Any, metadata: Any) -> None:
    seen: set[tuple[str, int, str]] = set()
    while True:
        await asyncio.sleep(2)
        try:
            answer = await stub.ListSubmissions(
                weights_pb2.ListSubmissionsRequest(page_size=50), metadata=metadata
            )
        except grpc.aio.AioRpcError:
            continue
        for submission in reversed(list(answer.submissions)):
            report = submission.report
            key = (report.validator_hotkey, report.epoch, report.report_id)
            if key in seen:
                continue
            seen.add(key)
            outcome = weights_pb2.SubmissionOutcome.Name(report.outcome).removeprefix(
                "SUBMISSION_OUTCOME_"
            )
            print(
                f"  {time.strftime('%H:%M:%S')}  epoch {report.epoch}: validator "
                f"{report.validator_hotkey[:8]}… {outcome.lower()}"
                + (f" at block {report.block}" if report.block else ""),
                flush=True,
            )


def _show_registry(message: registry_pb2.WatchRegistryResponse) -> None:
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


def _show_epoch(epoch: Any) -> None:
    parts = []
    for result in epoch.challenges:
        status = weights_pb2.ChallengeEpochStatus.Name(result.status).split("_")[-1]
        parts.append(f"{result.slug} {status}" + (f" ({result.reason})" if result.reason else ""))
    vector = epoch.vector
    top = sorted(vector.weights, key=lambda w: -w.weight)[:6]
    shown = ", ".join(f"uid {w.uid}: {w.weight:.3f}" for w in top)
    print(
        f"  {time.strftime('%H:%M:%S')}  epoch {vector.epoch} sealed: "
        + ("; ".join(parts) or "no active challenges")
        + f" | {shown}{' …' if len(vector.weights) > 6 else ''}",
        flush=True,
    )
