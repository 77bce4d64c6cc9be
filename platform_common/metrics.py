"""Prometheus metrics of the platform's processes, and the endpoint that serves them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

GRPC_REQUESTS = Counter(
    "platform_grpc_requests_total",
    "gRPC calls handled, by full method and status code.",
    ["method", "code"],
)
GRPC_LATENCY = Histogram(
    "platform_grpc_request_seconds",
    "Time to handle a unary gRPC call, by full method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
GRPC_AUTH_FAILURES = Counter(
    "platform_grpc_auth_failures_total",
    "Calls refused by authentication, by full method and reason.",
    ["method", "reason"],
)
WATCH_STREAMS = Gauge(
    "platform_watch_streams",
    "Open watch streams, by service.",
    ["service"],
)
WATCH_RESYNCS = Counter(
    "platform_watch_snapshots_total",
    "Snapshots sent on watch streams, by service and reason.",
    ["service", "reason"],
)
REGISTRY_REVISION = Gauge(
    "platform_registry_revision",
    "Newest registry revision this process has applied.",
)
REGISTRY_WRITES = Counter(
    "platform_registry_writes_total",
    "Registry writes, by operation and outcome (ok or the refusal kind).",
    ["operation", "outcome"],
)
REGISTRY_FEED_ERRORS = Counter(
    "platform_registry_feed_errors_total",
    "Failures to read the registry event log (retried).",
)


# (healthy, details): what ``/healthz`` answers, 200 or 503 with the details as JSON.
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr: the process logs JSON."""


class MetricsServer:
    """``/metrics`` (and ``/healthz`` when given a health check) on its own thread,
    stoppable."""

    def __init__(self, host: str, port: int, health: HealthCheck | None = None) -> None:
        metrics_app = make_wsgi_app()

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if health is not None and environ.get("PATH_INFO") == "/healthz":
                ok, details = health()
                body = json.dumps({"status": "ok" if ok else "unhealthy", **details}).encode()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result

        self._server: WSGIServer = make_server(
            host, port, app, ThreadingWSGIServer, handler_class=_Quiet
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
