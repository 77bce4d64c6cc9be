"""platform_common.metrics.MetricsServer: /metrics, and /healthz when given a check."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from platform_common.metrics import MetricsServer


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_healthz_follows_the_check_and_metrics_are_served() -> None:
    state: dict[str, Any] = {"ok": True, "details": {"streams": {"weights": "connected"}}}
    server = MetricsServer("127.0.0.1", 0, lambda: (state["ok"], state["details"]))
    try:
        status, body = get(server.port, "/healthz")
        assert status == 200
        assert json.loads(body) == {"status": "ok", "streams": {"weights": "connected"}}
        state["ok"] = False
        status, body = get(server.port, "/healthz")
        assert status == 503
        assert json.loads(body)["status"] == "unhealthy"
        status, body = get(server.port, "/metrics")
        assert status == 200
        assert b"platform_grpc_requests_total" in body
    finally:
        server.stop()


def test_without_a_check_there_is_no_health_answer() -> None:
    server = MetricsServer("127.0.0.1", 0)
    try:
        status, body = get(server.port, "/healthz")
        assert status == 200
        assert b'"status"' not in body  # the metrics page, not a health answer
    finally:
        server.stop()
