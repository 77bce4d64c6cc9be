"""Prometheus metrics of the platform's processes, and the endpoint that serves them."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


class MetricsServer:
    """The ``/metrics`` endpoint on its own thread, stoppable."""

    def __init__(self, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
