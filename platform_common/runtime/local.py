"""The local runtime: each challenge and its shim as supervised processes on this machine.

For development, demos and small deployments without Kubernetes. The image map
(:mod:`platform_common.runtime.images`) says which local command stands for which
image. Per challenge, one supervisor task:

1. starts the challenge in its own session (so a signal to its owner's process
   group, or the owner's exit, does not take it down) with the token in its
   environment, on addresses the runtime chose, and waits for its ready file;
2. starts ``platform shim`` in front of it (transport from the image map, token in
   ``PLATFORM_SHIM_CHALLENGE_TOKEN``) and waits for the shim's ready file;
3. watches both; when either exits, stops the other and starts the pair again after
   an exponential backoff with jitter (reset once a run lasted ``stable_after``).

Everything about an instance lives under ``<state_dir>/challenges/<slug>/``: the
logs of both processes, appended across restarts (``challenge.log``, ``shim.log``),
and ``instance.json``, the record that lets the next owner find the processes
again: process ids with their kernel start times (so a reused PID is never taken
for ours), addresses, the spec digest. Never the token. After the owner restarts,
:meth:`LocalRuntime.adopt` takes over the instances it still wants and stops the
rest. Processes of an adopted instance are not the new owner's children, so they
are watched by polling ``/proc`` rather than waited on.

The processes get a small, explicit environment (``PATH``, ``HOME``, locale, the
challenge's own variables and the runtime's), never the owner's: the master's
admin token or hotkey must not leak into a challenge.

Process identity relies on Linux ``/proc`` (start time, boot id). Elsewhere the
runtime still supervises its own children, but cannot tell a reused PID apart.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from platform_common.config import ConfigError, join_host_port, parse_host_port
from platform_common.files import write_atomically
from platform_common.ports import free_ports
from platform_common.runtime.images import ImageEntry, ImageMap, UnknownImage
from platform_common.runtime.interface import (
    Instance,
    InstanceState,
    RuntimeBusy,
    RuntimeSpec,
    utcnow,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
RECORD = "instance.json"
RECORD_VERSION = 1
LOCK = "runtime.lock"
ROLES = ("challenge", "shim")
# The only variables of the owner's environment a challenge or shim sees.
PASSTHROUGH_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
CHALLENGE_TOKEN_ENV = "CHALLENGE_TOKEN"  # noqa: S105 - a variable name, not a secret
SHIM_TOKEN_ENV = "PLATFORM_SHIM_CHALLENGE_TOKEN"  # noqa: S105
SLUG_ENV = "PLATFORM_CHALLENGE_SLUG"
BROKER_ENV = "PLATFORM_BROKER_ADDR"
_READY_POLL = 0.05
_KILL_WAIT = 5.0
_TAIL_BYTES = 2048

# Child processes left running on purpose by ``close(stop_instances=False)``: their
# Popen objects stay referenced so that garbage collection neither warns about them
# nor counts them as abandoned; the next owner adopts the processes.
_DETACHED: list[subprocess.Popen[bytes]] = []


def default_shim_argv() -> list[str]:
    """``platform shim`` of the running installation: the console script next to the
    interpreter when there is one, else the CLI module."""
    script = Path(sys.executable).with_name("platform")
    if script.exists():
        return [str(script), "shim"]
    return [sys.executable, "-m", "platform_common.cli", "shim"]


# ---------------------------------------------------------------------------
# Processes


def boot_id() -> str:
    """This boot's id (Linux); "" where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), None if it is gone or a
    zombie. Where /proc does not exist, 0 for any live process (no reuse check)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class Proc:
    """One process of an instance: ours (a Popen) or adopted (known by PID and start time)."""

    def __init__(
        self,
        role: str,
        pid: int,
        started: int | None,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.role = role
        self.pid = pid
        self.started = started
        self.popen = popen
        self._exit = ""

    def gone(self) -> str:
        """How the process ended ("" while it runs)."""
        if self._exit:
            return self._exit
        if self.popen is not None:
            code = self.popen.poll()
            if code is not None:
                self._exit = _describe_exit(code)
        elif self.started is None or start_time(self.pid) != self.started:
            self._reap()
            self._exit = "exited (status unknown: adopted, not a child)"
        return self._exit

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process's group (it leads its own session), if it runs."""
        if self.gone():
            return
        try:
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self) -> None:
        # An adopted process may still be a child of this interpreter (a previous
        # runtime in the same process started it): collect its zombie.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.started}


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


async def terminate(procs: Sequence[Proc], grace: float) -> None:
    """SIGTERM every process, SIGKILL those still running after ``grace`` seconds."""
    for proc in procs:
        proc.signal(signal.SIGTERM)
    await _until(lambda: all(p.gone() for p in procs), grace)
    for proc in procs:
        if not proc.gone():
            log.warning(
                "process ignored SIGTERM; killing it",
                extra={"role": proc.role, "pid": proc.pid, "grace_seconds": grace},
            )
            proc.signal(signal.SIGKILL)
    await _until(lambda: all(p.gone() for p in procs), _KILL_WAIT)


async def _until(done: Callable[[], bool], within: float) -> None:
    """Poll ``done`` until it holds or ``within`` seconds passed (processes that are not
    our children cannot be waited on, only looked at)."""
    deadline = time.monotonic() + within
    while True:
        if done() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(_READY_POLL)


def _tail(path: Path) -> str:
    """The last non-empty line of a log, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.strip() and not line.startswith("--- platform runtime"):
            return line.strip()[:300]
    return ""


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically, readable by the owner only."""
    write_atomically(path, json.dumps(data, indent=1, sort_keys=True), private=True)


def _read_ready(path: Path) -> dict[str, Any] | None:
    """A ready file's JSON object; None until it is complete."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def _reachable(address: str) -> bool:
    host, port = parse_host_port(address, "address")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _StartFailed(Exception):
    """A start attempt failed; retried after a backoff."""


class _Interrupted(Exception):
    """Stop requested, or another spec wanted, while starting."""


# ---------------------------------------------------------------------------
# One instance


class _Supervisor:
    """Runs one challenge and its shim, restarting the pair when either exits."""

    def __init__(self, runtime: LocalRuntime, slug: str) -> None:
        self.rt = runtime
        self.slug = slug
        self.dir = runtime.instance_dir(slug)
        self.spec: RuntimeSpec | None = None
        self.wanted = ""  # digest of self.spec
        self.digest = ""  # digest of the pair running or being started
        self.image = ""
        self.state = InstanceState.STARTING
        self.since = utcnow()
        self.message = ""
        self.last_exit = ""
        self.restarts = 0
        self.failed_digest = ""  # FAILED for this digest: not retried until the spec changes
        self.challenge: Proc | None = None
        self.shim: Proc | None = None
        self.addresses: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.stop_requested = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._run_began = time.monotonic()

    # -- control (called by the runtime) ---------------------------------------

    def want(self, spec: RuntimeSpec) -> None:
        digest = spec.digest()
        self.spec = spec
        if digest != self.wanted:
            self.wanted = digest
            if not self.digest:
                self.digest, self.image = digest, spec.image
            self.wake.set()

    def launch(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"runtime-{self.slug}")

    async def shutdown(self) -> Instance:
        self.stop_requested = True
        self.wake.set()
        if self.task is not None:
            await self.task
        return self.snapshot()

    async def detach(self) -> None:
        """Stop supervising; leave the processes running for the next owner."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for proc in (self.challenge, self.shim):
            if proc is not None and proc.popen is not None and not proc.gone():
                _DETACHED.append(proc.popen)

    def snapshot(self) -> Instance:
        pids = {p.role: p.pid for p in (self.challenge, self.shim) if p is not None}
        running = self.state is InstanceState.RUNNING
        digest, state, image = self.digest, self.state, self.image
        if self.challenge is None and self.wanted and self.wanted != self.digest:
            # A new spec accepted while nothing runs (FAILED, BACKOFF): it starts next.
            digest, state = self.wanted, InstanceState.STARTING
            image = self.spec.image if self.spec is not None else image
        return Instance(
            slug=self.slug,
            digest=digest,
            state=state,
            image=image,
            shim_address=self.addresses.get("shim") if running else None,
            public_address=self.addresses.get("public") if running else None,
            pids=pids,
            restarts=self.restarts,
            last_exit=self.last_exit,
            message=self.message,
            since=self.since,
        )

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as exc:
            # A fault of the runtime itself: never leave processes unwatched.
            log.exception("challenge supervisor failed", extra={"slug": self.slug})
            self.last_exit = f"runtime fault: {type(exc).__name__}: {exc}"
            self.failed_digest = self.digest
            self._set(InstanceState.FAILED, self.last_exit)
            await self._stop_pair()

    async def _loop(self) -> None:
        failures = 0
        while not self._stop_wanted():
            if self.challenge is None:
                if self.spec is None or self.wanted == self.failed_digest:
                    await self._pause(None)
                    continue
                outcome = await self._start(self.spec)
                if outcome == "running":
                    self._run_began = time.monotonic()
                elif outcome == "failed":
                    failures += 1
                    await self._backoff(failures)
                    continue
                else:  # FAILED, or interrupted by a stop or another spec
                    continue
            ended = await self._watch()
            if not ended:
                if self._stop_wanted():
                    break
                self._set(InstanceState.STOPPING, "replacing: the spec changed")
                log.info(
                    "challenge instance replaced: the spec changed",
                    extra={"slug": self.slug, "digest": self.digest[:12], "next": self.wanted[:12]},
                )
                await self._stop_pair()
                failures = 0
                continue
            self.last_exit = ended
            ran = time.monotonic() - self._run_began
            failures = 1 if ran >= self.rt.stable_after else failures + 1
            self._set(InstanceState.BACKOFF, f"{ended}; stopping the rest of the instance")
            log.warning(
                "challenge instance exited; restarting",
                extra={"slug": self.slug, "last_exit": ended, "restarts": self.restarts},
            )
            await self._stop_pair()
            if self.spec is None:
                # Adopted, and its spec not given again yet: nothing to restart with.
                self._set(InstanceState.BACKOFF, "exited; restarts when its spec is ensured")
                continue
            await self._backoff(failures)
        self._set(InstanceState.STOPPING, "stop requested")
        await self._stop_pair()
        self._set(InstanceState.STOPPED, "")
        log.info("challenge instance stopped", extra={"slug": self.slug})

    async def _pause(self, seconds: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.wake.clear()

    def _stop_wanted(self) -> bool:
        # A method, not the attribute: the flag changes while this task awaits.
        return self.stop_requested

    def _interrupted(self) -> bool:
        return self.stop_requested or (bool(self.wanted) and self.wanted != self.digest)

    def _set(self, state: InstanceState, message: str) -> None:
        if state is not self.state:
            self.since = utcnow()
        self.state = state
        self.message = message

    async def _backoff(self, failures: int) -> None:
        base = min(self.rt.backoff_max, self.rt.backoff_initial * 2 ** (failures - 1))
        # Jitter keeps instances that failed together from restarting in lockstep.
        delay = base * random.uniform(0.8, 1.2)  # noqa: S311 - not for security
        self._set(InstanceState.BACKOFF, f"restarting in {delay:.1f} s")
        deadline = time.monotonic() + delay
        while not self._interrupted() and (left := deadline - time.monotonic()) > 0:
            await self._pause(left)
        if not self.stop_requested:
            self.restarts += 1

    async def _watch(self) -> str:
        """Until a process exits (how, as text) or the instance is interrupted ("")."""
        while not self._interrupted():
            for proc in (self.challenge, self.shim):
                if proc is not None and (how := proc.gone()):
                    return f"{proc.role} {how}"
            await self._pause(self.rt.watch_interval)
        return ""

    # -- starting ------------------------------------------------------------------

    async def _start(self, spec: RuntimeSpec) -> str:
        """One start attempt: "running", "failed" (retry), "config" (FAILED), "interrupted"."""
        self.digest, self.image = self.wanted, spec.image
        self._set(InstanceState.STARTING, "")
        try:
            entry = self.rt.images.resolve(spec.image)
        except UnknownImage as exc:
            return self._fail(str(exc))
        try:
            await self._start_pair(spec, entry)
        except _Interrupted:
            await self._stop_pair()
            return "interrupted"
        except _StartFailed as exc:
            self.last_exit = str(exc)
            log.warning(
                "challenge instance did not start", extra={"slug": self.slug, "error": str(exc)}
            )
            self.ports = {}  # fresh ports next time, in case one was taken meanwhile
            await self._stop_pair()
            return "failed"
        except OSError as exc:  # the command cannot be executed at all
            await self._stop_pair()
            return self._fail(f"cannot start {spec.image!r}: {exc}")
        self._set(InstanceState.RUNNING, "")
        self._save_record()
        log.info(
            "challenge instance running",
            extra={
                "slug": self.slug,
                "shim": self.addresses.get("shim"),
                "public": self.addresses.get("public"),
                "pids": self.snapshot().pids,
                "restarts": self.restarts,
                "digest": self.digest[:12],
            },
        )
        return "running"

    def _fail(self, reason: str) -> str:
        self.failed_digest = self.digest
        self.last_exit = reason
        self._set(InstanceState.FAILED, reason)
        log.error("challenge instance cannot run", extra={"slug": self.slug, "error": reason})
        return "config"

    async def _start_pair(self, spec: RuntimeSpec, entry: ImageEntry) -> None:
        rt = self.rt
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        roles = ("internal", "public", "shim") + (("broker",) if rt.master_address else ())
        if set(roles) - set(self.ports):
            # Chosen once and kept across restarts, so placement stays put; fresh ones
            # only after a start attempt failed (one of them may have been taken).
            self.ports = dict(zip(roles, free_ports(len(roles)), strict=True))
        internal = join_host_port(HOST, self.ports["internal"])
        public = join_host_port(HOST, self.ports["public"])
        broker = join_host_port(HOST, self.ports["broker"]) if rt.master_address else ""
        ready_file = self.dir / "challenge.ready.json"
        ready_file.unlink(missing_ok=True)
        argv = entry.command(
            python=rt.python,
            root=str(rt.images.root),
            slug=self.slug,
            internal=internal,
            public=public,
            ready_file=str(ready_file),
        )
        env = {
            **rt.base_env(),
            **entry.env,
            **spec.env,
            CHALLENGE_TOKEN_ENV: spec.token,
            SLUG_ENV: self.slug,
        }
        if broker:
            env[BROKER_ENV] = broker
        self.addresses = {}
        self.challenge = self._spawn("challenge", argv, env, rt.images.root, spec.image)
        self._save_record()
        ready = await self._await_ready(
            self.challenge, ready_file if entry.ready is not None else None, internal
        )
        if entry.ready is not None:
            internal = self._ready_address(ready, entry.ready["internal"])
            public_key = entry.ready.get("public")
            public_address: str | None = (
                self._ready_address(ready, public_key)
                if public_key
                else (public if entry.uses_public else None)
            )
        else:
            public_address = public if entry.uses_public else None

        shim_ready = self.dir / "shim.ready.json"
        shim_ready.unlink(missing_ok=True)
        shim_argv = [
            *rt.shim_argv,
            "--listen",
            join_host_port(HOST, self.ports["shim"]),
            "--slug",
            self.slug,
            "--challenge-address",
            internal,
            "--transport",
            entry.transport,
            "--metrics-listen",
            "",
            "--shutdown-grace",
            f"{max(0.5, rt.grace / 2):g}",
            "--ready-file",
            str(shim_ready),
        ]
        if broker:
            shim_argv += ["--master-address", rt.master_address, "--broker-listen", broker]
        shim_env = {**rt.base_env(), SHIM_TOKEN_ENV: spec.token}
        self.shim = self._spawn("shim", shim_argv, shim_env, self.dir, spec.image)
        self._save_record()
        shim_info = await self._await_ready(self.shim, shim_ready, None)
        self.addresses = {
            "internal": internal,
            "shim": self._ready_address(shim_info, "listen"),
        }
        if public_address:
            self.addresses["public"] = public_address
        if broker:
            self.addresses["broker"] = broker

    def _spawn(
        self, role: str, argv: list[str], env: dict[str, str], cwd: Path, image: str
    ) -> Proc:
        log_path = self.rt.log_path(self.slug, role)
        self.rt.rotate_log(log_path)
        with log_path.open("ab") as out:
            out.write(
                f"--- platform runtime: starting the {role} of {self.slug} ({image}), "
                f"{self.restarts} restarts so far, at {utcnow().isoformat()} ---\n".encode()
            )
            out.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(role, popen.pid, start_time(popen.pid), popen)
        log.debug("process started", extra={"slug": self.slug, "role": role, "pid": popen.pid})
        return proc

    async def _await_ready(
        self, proc: Proc, ready_file: Path | None, probe: str | None
    ) -> dict[str, Any]:
        """The ready file's content once written (or {} once ``probe`` accepts TCP)."""
        deadline = time.monotonic() + self.rt.start_timeout
        while True:
            if self._interrupted():
                raise _Interrupted
            if ready_file is not None:
                data = _read_ready(ready_file)
                if data is not None:
                    return data
            elif probe is not None and await _reachable(probe):
                return {}
            if how := proc.gone():
                tail = _tail(self.rt.log_path(self.slug, proc.role))
                last = f"; last log line: {tail}" if tail else ""
                raise _StartFailed(f"{proc.role} {how} before it was ready{last}")
            if time.monotonic() > deadline:
                raise _StartFailed(
                    f"{proc.role} was not ready within {self.rt.start_timeout:g} s "
                    f"(see {self.rt.log_path(self.slug, proc.role)})"
                )
            await self._pause(_READY_POLL)

    def _ready_address(self, ready: Mapping[str, Any], key: str) -> str:
        value = ready.get(key)
        if not isinstance(value, str):
            raise _StartFailed(f"the ready file has no address under {key!r}; got {dict(ready)}")
        try:
            parse_host_port(value, key)
        except ConfigError as exc:
            raise _StartFailed(f"the ready file's {key!r}: {exc}") from exc
        return value

    # -- stopping and the record ----------------------------------------------------

    async def _stop_pair(self) -> None:
        procs = [p for p in (self.shim, self.challenge) if p is not None]
        if procs:
            await terminate(procs, self.rt.grace)
        self.challenge = self.shim = None
        self.addresses = {}
        with contextlib.suppress(OSError):
            (self.dir / RECORD).unlink()

    def _save_record(self) -> None:
        processes = {p.role: p.record() for p in (self.challenge, self.shim) if p is not None}
        _write_json(
            self.dir / RECORD,
            {
                "version": RECORD_VERSION,
                "slug": self.slug,
                "image": self.image,
                "digest": self.digest,
                "state": self.state.value,
                "boot_id": boot_id(),
                "restarts": self.restarts,
                "since": self.since.isoformat(),
                "processes": processes,
                "addresses": self.addresses,
            },
        )

    def adopt(self, record: Mapping[str, Any], procs: dict[str, Proc]) -> None:
        self.challenge, self.shim = procs["challenge"], procs["shim"]
        self.digest = str(record["digest"])
        self.image = str(record.get("image", ""))
        self.restarts = int(record.get("restarts", 0))
        self.addresses = {str(k): str(v) for k, v in record["addresses"].items()}
        # Restart on the same ports if the adopted pair exits (when they are distinct).
        ports = {}
        for role in ("internal", "public", "shim", "broker"):
            with contextlib.suppress(KeyError, ConfigError):
                ports[role] = parse_host_port(self.addresses[role], role)[1]
        if len(set(ports.values())) == len(ports):
            self.ports = ports
        with contextlib.suppress(ValueError, TypeError):
            self.since = datetime.fromisoformat(str(record["since"]))
        self.state = InstanceState.RUNNING
        self._run_began = time.monotonic()


# ---------------------------------------------------------------------------
# The runtime


class LocalRuntime:
    """The :class:`~platform_common.runtime.interface.Runtime` of local processes.

    One owner at a time per ``state_dir`` (a lock file; a second one gets
    :class:`RuntimeBusy`). ``images`` maps images to commands; ``shim_argv`` is how
    ``platform shim`` is started (default: this installation's). ``grace`` is the
    time between SIGTERM and SIGKILL; ``start_timeout`` how long each process may
    take to be ready; ``master_address``, when set, enables each shim's broker door
    towards that address (an attribute too: an owner that learns its own address only
    once serving sets it before the first ``ensure``).
    """

    def __init__(
        self,
        state_dir: Path,
        images: ImageMap,
        *,
        shim_argv: Sequence[str] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        grace: float = 5.0,
        start_timeout: float = 60.0,
        stable_after: float = 30.0,
        watch_interval: float = 0.25,
        master_address: str = "",
        python: str = sys.executable,
        max_log_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        for name, value in (
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
            ("grace", grace),
            ("start_timeout", start_timeout),
            ("watch_interval", watch_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name}: must be positive; got {value}")
        if backoff_max < backoff_initial:
            raise ValueError("backoff_max: must be at least backoff_initial")
        if master_address:
            parse_host_port(master_address, "master_address")
        self.state_dir = state_dir.resolve()  # processes run in other directories
        self.images = images
        self.shim_argv = list(shim_argv) if shim_argv is not None else default_shim_argv()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.grace = grace
        self.start_timeout = start_timeout
        self.stable_after = stable_after
        self.watch_interval = watch_interval
        self.master_address = master_address
        self.python = python
        self.max_log_bytes = max_log_bytes
        (self.state_dir / "challenges").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd: int | None = _take_lock(self.state_dir / LOCK)
        self._instances: dict[str, _Supervisor] = {}
        # Being stopped: still reported (STOPPING) until their processes are gone.
        self._stopping: dict[str, tuple[_Supervisor, asyncio.Future[Instance]]] = {}
        self._adopted = False
        self._closed = False

    # -- paths ------------------------------------------------------------------------

    def instance_dir(self, slug: str) -> Path:
        return self.state_dir / "challenges" / slug

    def log_path(self, slug: str, role: str) -> Path:
        """Where the ``role`` ("challenge" or "shim") of ``slug`` logs."""
        return self.instance_dir(slug) / f"{role}.log"

    def rotate_log(self, path: Path) -> None:
        """Keep one previous generation once a log outgrows ``max_log_bytes``."""
        with contextlib.suppress(OSError):
            if path.stat().st_size > self.max_log_bytes:
                path.replace(path.with_name(path.name + ".1"))

    def base_env(self) -> dict[str, str]:
        return {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}

    # -- the Runtime interface -----------------------------------------------------------

    async def ensure(self, spec: RuntimeSpec) -> Instance:
        self._check_open()
        if spec.slug in self._stopping:
            await asyncio.shield(self._stopping[spec.slug][1])
        supervisor = self._instances.get(spec.slug)
        if supervisor is None and not self._adopted:
            # adopt() was not called: still never start a second copy of what runs.
            await self._take_over([spec.slug], desired={spec.slug})
            supervisor = self._instances.get(spec.slug)
        if supervisor is None:
            supervisor = _Supervisor(self, spec.slug)
            supervisor.want(spec)
            self._instances[spec.slug] = supervisor
            supervisor.launch()
            log.info(
                "challenge instance starting",
                extra={"slug": spec.slug, "image": spec.image, "digest": supervisor.wanted[:12]},
            )
        else:
            supervisor.want(spec)
            if supervisor.task is None or supervisor.task.done():
                supervisor.launch()  # after a fault of its own (logged), try again
        return supervisor.snapshot()

    async def stop(self, slug: str) -> Instance | None:
        self._check_open()
        return await self._stop(slug)

    async def status(self, slug: str) -> Instance | None:
        supervisor = self._instances.get(slug) or self._stopping.get(slug, (None,))[0]
        return supervisor.snapshot() if supervisor is not None else None

    async def list(self) -> builtins.list[Instance]:
        supervisors = {slug: sup for slug, (sup, _) in self._stopping.items()}
        supervisors.update(self._instances)
        return [supervisors[slug].snapshot() for slug in sorted(supervisors)]

    async def adopt(self, desired: Iterable[str]) -> builtins.list[Instance]:
        self._check_open()
        wanted = set(desired)
        adopted = await self._take_over(recorded_slugs(self.state_dir), desired=wanted)
        self._adopted = True
        return adopted

    async def close(self, *, stop_instances: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if stop_instances:
                await asyncio.gather(*(self._stop(slug) for slug in list(self._instances)))
            else:
                for supervisor in self._instances.values():
                    await supervisor.detach()
                log.info(
                    "runtime closed; instances left running for adoption",
                    extra={"slugs": sorted(self._instances)},
                )
                self._instances.clear()
            if self._stopping:
                pending = [future for _, future in self._stopping.values()]
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeBusy("the runtime is closed")

    async def _stop(self, slug: str) -> Instance | None:
        supervisor = self._instances.pop(slug, None)
        if supervisor is None:
            if slug in self._stopping:
                return await asyncio.shield(self._stopping[slug][1])
            if not self._adopted:
                await self._take_over([slug], desired=set())
            return None
        future = asyncio.ensure_future(supervisor.shutdown())
        self._stopping[slug] = (supervisor, future)
        future.add_done_callback(lambda _: self._stopping.pop(slug, None))
        return await asyncio.shield(future)

    async def _take_over(
        self, slugs: Iterable[str], *, desired: set[str]
    ) -> builtins.list[Instance]:
        """Adopt the recorded instances of ``slugs`` that are desired and intact; stop the
        processes of every other record and remove it."""
        adopted: builtins.list[Instance] = []
        orphans: builtins.list[tuple[str, builtins.list[Proc], str]] = []
        for slug in slugs:
            if slug in self._instances or slug in self._stopping:
                continue
            path = self.instance_dir(slug) / RECORD
            record = _read_record(path)
            if record is None:
                continue
            procs = _recorded_procs(record)
            alive = {role: p for role, p in procs.items() if not p.gone()}
            if slug not in desired:
                reason = "not desired"
            elif record.get("state") != InstanceState.RUNNING.value:
                reason = f"left while {record.get('state')}"
            elif record.get("boot_id") != boot_id():
                reason = "recorded before the last boot"
            elif set(alive) != set(ROLES):
                reason = "processes gone: " + ", ".join(sorted(set(ROLES) - set(alive)))
            else:
                supervisor = _Supervisor(self, slug)
                supervisor.adopt(record, alive)
                self._instances[slug] = supervisor
                supervisor.launch()
                adopted.append(supervisor.snapshot())
                log.info(
                    "challenge instance adopted",
                    extra={"slug": slug, "pids": supervisor.snapshot().pids},
                )
                continue
            orphans.append((slug, list(alive.values()), reason))

        async def stop_orphan(slug: str, procs: builtins.list[Proc], reason: str) -> None:
            log.info(
                "stopping an orphaned challenge instance",
                extra={"slug": slug, "reason": reason, "pids": [p.pid for p in procs]},
            )
            await terminate(procs, self.grace)
            with contextlib.suppress(OSError):
                (self.instance_dir(slug) / RECORD).unlink()

        await asyncio.gather(*(stop_orphan(*orphan) for orphan in orphans))
        return adopted


def recorded_slugs(state_dir: Path) -> list[str]:
    """The challenges with an instance record in the runtime state directory ``state_dir``:
    instances an owner left running, for the next one to adopt or stop."""
    return sorted(p.parent.name for p in (state_dir / "challenges").glob(f"*/{RECORD}"))


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error(
            "unreadable instance record removed; its processes, if any, are not ours to stop",
            extra={"path": str(path), "error": str(exc)},
        )
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        log.error("instance record of an unknown format ignored", extra={"path": str(path)})
        return None
    return record


def _recorded_procs(record: Mapping[str, Any]) -> dict[str, Proc]:
    out = {}
    processes = record.get("processes")
    if not isinstance(processes, dict):
        return {}
    for role, entry in processes.items():
        if role not in ROLES or not isinstance(entry, dict):
            continue
        pid, started = entry.get("pid"), entry.get("start_time")
        if isinstance(pid, int) and pid > 0 and isinstance(started, int):
            out[role] = Proc(role, pid, started)
    return out


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeBusy(
            f"{path.parent}: another runtime owns this state directory ({path.name} is locked)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
