"""The translated edge in a real Envoy, run from a static bootstrap (no master).

What the edge promises is Envoy's behaviour on the wire, not the shape of its config: these
tests send real requests (raw request-targets, so no client library normalizes anything) and
look at both sides, what the client got and what the recording upstream received. The
ext_authz cluster points at a closed port except in the last group, where a stub
authorization service stands in for the master to exercise the per-hotkey limits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from master.edge.model import (
    PATH_OVERRIDE_HEADERS,
    PLATFORM_HEADER_PREFIX,
    VERIFIED_HOTKEY_HEADER,
    VERIFIED_UID_HEADER,
    EdgeChallenge,
    EdgeLimits,
    EdgeSettings,
    EdgeState,
)
from master.edge.proxy import render_bootstrap
from master.edge.translate import static_bootstrap, translate
from tests.edge.envoy_support import (
    RawResponse,
    StaticEnvoy,
    StubAuthz,
    UpstreamServer,
    https_get,
    raw_request,
    raw_request_bytes,
    self_signed_certificate,
)
from tests.support.master import VENV_BIN
from tests.support.ports import free_port

BODY_LIMIT = 1024
IP_LIMIT = 3
HOTKEY_LIMIT = 2
GENEROUS = 100_000
CUSTOM_BLOCKED = ("/admin", "/debug")
BLOCKED_NAMES = frozenset({"internal", "health", "version", "admin", "debug"})
EDGE_TOKEN = "test-edge-token"
# The overload manager looks at the heap every 0.25 s.
OVERLOAD_WAIT_S = 10.0


def _limits(
    *, ip: int = GENEROUS, hotkey: int = GENEROUS, body: int = BODY_LIMIT, timeout: int = 30
) -> EdgeLimits:
    return EdgeLimits(
        rate_per_hotkey_per_minute=hotkey,
        rate_per_ip_per_minute=ip,
        max_request_body_bytes=body,
        request_timeout_seconds=timeout,
    )


@dataclass(frozen=True)
class Edge:
    envoy: StaticEnvoy
    upstream: UpstreamServer
    port: int

    def get(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        source_ip: str | None = None,
    ) -> RawResponse:
        return raw_request(
            self.port, target, method=method, headers=headers, body=body, source_ip=source_ip
        )


@contextlib.contextmanager
def _run_edge(
    state: EdgeState,
    workdir: Path,
    upstream: UpstreamServer,
    envoy_args: Sequence[str] = (),
    overload_manager: dict[str, Any] | None = None,
) -> Iterator[Edge]:
    bootstrap = static_bootstrap(translate(state), admin_host="127.0.0.1", admin_port=free_port())
    if overload_manager is not None:
        bootstrap["overload_manager"] = overload_manager
    envoy = StaticEnvoy(bootstrap, workdir, envoy_args)
    envoy.start()
    try:
        yield Edge(envoy, upstream, state.settings.listen_port)
    finally:
        envoy.stop()


@contextlib.contextmanager
def _edge_with_upstream(
    workdir: Path,
    challenges: Callable[[int], tuple[EdgeChallenge, ...]],
    envoy_args: Sequence[str] = (),
    overload_manager: dict[str, Any] | None = None,
    **settings: Any,
) -> Iterator[Edge]:
    """An edge in front of a new recording upstream, with ``challenges(upstream_port)``;
    ``envoy_args`` are more Envoy options, ``overload_manager`` the bootstrap's (none by
    default), ``settings`` more :class:`EdgeSettings` fields. Unless ``authz_port`` is among
    them, nothing listens on the authz port: signed routes must fail closed."""
    upstream = UpstreamServer().start()
    try:
        fields: dict[str, Any] = {"authz_port": free_port(), **settings}
        state = EdgeState(
            settings=EdgeSettings(listen_port=free_port(), edge_token=EDGE_TOKEN, **fields),
            challenges=challenges(upstream.port),
        )
        with _run_edge(state, workdir, upstream, envoy_args, overload_manager) as edge:
            yield edge
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    def challenges(port: int) -> tuple[EdgeChallenge, ...]:
        up = ("127.0.0.1", port)
        return (
            EdgeChallenge("open", *up, _limits(), blocked_path_prefixes=CUSTOM_BLOCKED),
            EdgeChallenge("limited", *up, _limits(ip=IP_LIMIT)),
            EdgeChallenge("down", "127.0.0.1", free_port(), _limits()),
            EdgeChallenge("signed", *up, _limits(), signed_path_prefixes=("/",)),
            EdgeChallenge("partial", *up, _limits(), signed_path_prefixes=("/submit",)),
        )

    with _edge_with_upstream(tmp_path_factory.mktemp("static-edge"), challenges) as edge:
        yield edge


def _json(response: RawResponse) -> object:
    assert response.headers.get("content-type") == "application/json", response.headers
    return json.loads(response.body)


# ---------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize(
    ("target", "upstream_path"),
    [
        ("/challenges/open/api/items?page=2", "/api/items?page=2"),
        ("/challenges/open/", "/"),
        ("/challenges/open", "/"),
        ("/challenges/open?x=1", "/?x=1"),
        # Whole-segment blocking: names that merely start like a blocked one pass.
        ("/challenges/open/internals", "/internals"),
        ("/challenges/open/healthy/x", "/healthy/x"),
        ("/challenges/open/administrators", "/administrators"),
        # Spaces, matrix parameters and dots inside a segment are ordinary path characters.
        ("/challenges/open/a%20b/c", "/a%20b/c"),
        ("/challenges/open/items;page=2", "/items;page=2"),
        ("/challenges/open/v1.2/x.json", "/v1.2/x.json"),
    ],
)
def test_public_route_is_served_without_the_slug_prefix(
    edge: Edge, target: str, upstream_path: str
) -> None:
    before = len(edge.upstream.requests())
    response = edge.get(target)
    assert response.status == 200, response.body
    assert response.json()["path"] == upstream_path
    assert edge.upstream.paths()[before:] == [upstream_path]


@pytest.mark.parametrize(
    "target", ["/challenges/nope/x", "/challenges/", "/", "/other", "/challenges/openx/a"]
)
def test_unknown_slugs_and_paths_outside_challenges_are_404(edge: Edge, target: str) -> None:
    before = len(edge.upstream.requests())
    response = edge.get(target)
    assert response.status == 404
    assert _json(response) == {"error": "not_found"}
    assert edge.upstream.paths()[before:] == []


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        # A tunnel matches no path route: answered at once, not held open.
        (
            b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
            403,
            "upgrade_not_supported",
        ),
        (
            b"GET /challenges/open/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            403,
            "upgrade_not_supported",
        ),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 404, "not_found"),
        (b"GET /challenges/open/x HTTP/1.0\r\nHost: a\r\n\r\n", 426, "upgrade_required"),
        (
            b"GET /challenges/open/x HTTP/1.1\r\nHost: a\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "not_implemented",
        ),
    ],
)
def test_requests_envoy_refuses_itself_are_answered_in_json(
    edge: Edge, request_bytes: bytes, status: int, error: str
) -> None:
    before = len(edge.upstream.requests())
    response = raw_request_bytes(edge.port, request_bytes)
    assert response.status == status
    assert _json(response) == {"error": error}
    assert edge.upstream.paths()[before:] == []


@pytest.mark.parametrize(
    "suffix", ["/internal", "/internal/x", "/health", "/version", "/admin", "/debug/x"]
)
def test_builtin_and_custom_blocked_prefixes_are_403(edge: Edge, suffix: str) -> None:
    before = len(edge.upstream.requests())
    response = edge.get(f"/challenges/open{suffix}")
    assert response.status == 403
    assert _json(response) == {"error": "forbidden", "reason": "internal_route"}
    assert edge.upstream.paths()[before:] == []


# ---------------------------------------------------------------------------------------------
# Headers, bodies, limits, failures, streaming


def test_platform_only_headers_from_clients_never_reach_the_upstream(edge: Edge) -> None:
    # The platform's own names, and any other name under its prefix, in any case.
    names = (
        VERIFIED_HOTKEY_HEADER,
        VERIFIED_UID_HEADER,
        "x-platform-challenge",
        "x-platform-challenge-slug",
        "x-platform-verified-role",
        "X-Platform-Anything",
    )
    forged = {name: "forged" for name in names}
    # Near misses are the client's own headers and pass.
    kept = {"x-other": "kept", "x-platforms": "kept", "platform-x": "kept"}
    before = len(edge.upstream.requests())
    response = edge.get("/challenges/open/whoami", headers={**forged, **kept})
    assert response.status == 200
    (received,) = edge.upstream.requests()[before:]
    assert {name: received.headers.get(name) for name in kept} == kept
    assert not [name for name in received.headers if name.startswith(PLATFORM_HEADER_PREFIX)]


@pytest.mark.parametrize("header", PATH_OVERRIDE_HEADERS)
def test_path_override_headers_never_reach_the_upstream(edge: Edge, header: str) -> None:
    before = len(edge.upstream.requests())
    response = edge.get(
        "/challenges/open/whoami", headers={header.upper(): "/internal/v1/get_weights"}
    )
    assert response.status == 200
    (received,) = edge.upstream.requests()[before:]
    assert received.path == "/whoami"
    assert header not in received.headers


@pytest.mark.parametrize(
    "suffix",
    [
        "/%20/x",  # a segment starting with whitespace
        "/;/x",  # matrix parameters with no segment name
        "/;a=b/x",
        "/.../x",  # only dots, which some servers trim away
        "/.%20/x",  # a dot segment a server trims into "." (or "..") after the edge routed it
        "/..%20/x",
        # A dot segment with matrix parameters (Tomcat reads "/..;/" as "/../"). Written
        # plainly, Envoy resolves it as a dot segment itself; encoded, it does not.
        "/%2e;/x",
        "/%2e%2e;a=b/x",
        "/.%3b/x",
        "/..%3Bx/x",
        "/x%00",  # encoded control characters anywhere
        "/x%0a",
        "/x%7F",
        "/%2569",  # double encoding
    ],
)
def test_segments_a_lenient_server_would_drop_are_refused(edge: Edge, suffix: str) -> None:
    before = len(edge.upstream.requests())
    response = edge.get(f"/challenges/open{suffix}")
    assert response.status == 400, response.body
    assert _json(response) == {"error": "bad_request"}
    assert edge.upstream.requests()[before:] == []


def test_header_names_with_underscores_are_refused(edge: Edge) -> None:
    before = len(edge.upstream.requests())
    response = edge.get(
        "/challenges/open/whoami", headers={"x_platform_verified_hotkey": "5Forged"}
    )
    assert response.status == 400
    assert _json(response) == {"error": "bad_request"}
    assert edge.upstream.requests()[before:] == []


def test_body_over_the_challenge_limit_is_413(edge: Edge) -> None:
    at_limit = edge.get("/challenges/open/upload", method="POST", body=b"a" * BODY_LIMIT)
    assert at_limit.status == 200
    assert at_limit.json()["body_bytes"] == BODY_LIMIT
    before = len(edge.upstream.requests())
    over = edge.get("/challenges/open/upload", method="POST", body=b"a" * (BODY_LIMIT + 1))
    assert over.status == 413
    assert _json(over) == {"error": "payload_too_large"}
    assert edge.upstream.requests()[before:] == []


def test_ip_rate_limit_is_per_client_address(edge: Edge) -> None:
    first, second = "127.0.0.2", "127.0.0.3"
    for _ in range(IP_LIMIT):
        ok = edge.get("/challenges/limited/x", source_ip=first)
        assert ok.status == 200
        assert ok.headers["x-ratelimit-limit"] == str(IP_LIMIT)
    refused = edge.get("/challenges/limited/x", source_ip=first)
    assert refused.status == 429
    assert _json(refused) == {"error": "rate_limited"}
    retry_after = refused.headers["retry-after"]
    assert retry_after.isdigit()
    assert int(retry_after) == 60 // IP_LIMIT
    assert refused.headers["x-ratelimit-remaining"] == "0"
    # Another client address has its own bucket of IP_LIMIT.
    for _ in range(IP_LIMIT):
        assert edge.get("/challenges/limited/x", source_ip=second).status == 200
    assert edge.get("/challenges/limited/x", source_ip=second).status == 429


def test_a_forwarded_for_header_does_not_change_the_client_address(edge: Edge) -> None:
    # No trusted proxies (the default): the header is the client's own claim and ignored,
    # so a client cannot get a fresh bucket by inventing addresses.
    for n in range(IP_LIMIT):
        forged = {"x-forwarded-for": f"203.0.113.{n + 1}"}
        assert (
            edge.get("/challenges/limited/x", source_ip="127.0.0.4", headers=forged).status == 200
        )
    forged = {"x-forwarded-for": "203.0.113.99"}
    assert edge.get("/challenges/limited/x", source_ip="127.0.0.4", headers=forged).status == 429


@pytest.fixture(scope="module")
def proxied_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """The edge behind one load balancer (``trusted_proxies=1``)."""

    def limited(port: int) -> tuple[EdgeChallenge, ...]:
        return (EdgeChallenge("limited", "127.0.0.1", port, _limits(ip=IP_LIMIT)),)

    workdir = tmp_path_factory.mktemp("proxied-edge")
    with _edge_with_upstream(workdir, limited, trusted_proxies=1) as edge:
        yield edge


def test_behind_a_trusted_proxy_the_limit_keys_on_the_forwarded_client(
    proxied_edge: Edge,
) -> None:
    edge = proxied_edge

    def via_balancer(client: str) -> RawResponse:
        # The balancer is one TCP peer for every client; it appends the client's address.
        return edge.get(
            "/challenges/limited/x",
            source_ip="127.0.0.5",
            headers={"x-forwarded-for": f"198.51.100.200, {client}"},
        )

    for _ in range(IP_LIMIT):
        assert via_balancer("203.0.113.1").status == 200
    assert via_balancer("203.0.113.1").status == 429
    # Another client behind the same balancer has its own bucket; the address a client
    # wrote itself (left of the balancer's entry) is not the key.
    for _ in range(IP_LIMIT):
        assert via_balancer("203.0.113.2").status == 200
    received = edge.upstream.requests()[-1]
    forwarded = [entry.strip() for entry in received.headers["x-forwarded-for"].split(",")]
    assert forwarded == ["198.51.100.200", "203.0.113.2", "127.0.0.5"]


def test_upstream_down_gives_a_safe_503(edge: Edge) -> None:
    response = edge.get("/challenges/down/anything")
    assert response.status == 503
    assert _json(response) == {"error": "challenge_unavailable"}


def test_an_envoy_over_its_heap_budget_says_so_with_503(tmp_path: Path) -> None:
    """The overload manager of the bootstrap the master renders, with a heap budget below
    what Envoy uses from its start: new requests get 503 naming the edge, not the challenge,
    and nothing reaches the upstream."""
    rendered = yaml.safe_load(
        render_bootstrap(
            node_id="test",
            admin_host="127.0.0.1",
            admin_port=0,
            xds_host="127.0.0.1",
            xds_port=1,
            edge_token=EDGE_TOKEN,
        )
    )
    overload = rendered["overload_manager"]
    (heap,) = [m for m in overload["resource_monitors"] if m["name"].endswith(".fixed_heap")]
    heap["typed_config"]["max_heap_size_bytes"] = 1024 * 1024

    def one(port: int) -> tuple[EdgeChallenge, ...]:
        return (EdgeChallenge("open", "127.0.0.1", port, _limits()),)

    with _edge_with_upstream(tmp_path, one, overload_manager=overload) as edge:
        active = "overload.envoy.overload_actions.stop_accepting_requests.active: 1"
        deadline = time.monotonic() + OVERLOAD_WAIT_S
        while active not in edge.envoy.admin_get("/stats?filter=stop_accepting")[1]:
            assert time.monotonic() < deadline, "the overload action never became active"
            time.sleep(0.05)
        response = edge.get("/challenges/open/x")
        assert response.status == 503
        assert _json(response) == {"error": "edge_overloaded"}
        assert edge.upstream.requests() == []
        # The stat operators.md points to: the heap's share of the budget, in percent.
        stats = edge.envoy.admin_get("/stats?filter=fixed_heap.pressure")[1]
        (pressure,) = re.findall(r"fixed_heap\.pressure: (\d+)", stats)
        assert int(pressure) > 100


def test_signed_routes_fail_closed_when_authz_is_unreachable(edge: Edge) -> None:
    before = len(edge.upstream.requests())
    for target in (
        "/challenges/signed/",
        "/challenges/signed/x",
        "/challenges/partial/submit",
        "/challenges/partial/SUBMIT/x",
        "/challenges/partial/submit;x=1",
    ):
        response = edge.get(target)
        assert response.status == 503, target
        assert _json(response) == {"error": "authorization_unavailable"}
    assert edge.upstream.requests()[before:] == []
    # The unsigned part of a partly signed challenge is public.
    assert edge.get("/challenges/partial/other").status == 200


@pytest.mark.parametrize(
    ("suffix", "status"),
    [
        ("/x/../submit", 503),
        ("/%73ubmit", 503),
        ("/Submit.json", 503),
        ("/;/submit", 400),
        ("/%20/submit", 400),
        ("/.../submit", 400),
        ("/submit%00", 400),
        ("/.%20/submit", 400),
        ("/x/..%20/submit", 400),
        ("/%2e;/submit", 400),
        ("/x/%2e%2e;x/submit", 400),
        ("/.%3b/submit", 400),
        # The challenge's public prefix again: a server that cuts it off itself (FastAPI's
        # root_path) would route this to /submit.
        ("/challenges/partial/submit", 403),
        ("/CHALLENGES/partial/x/../submit", 403),
    ],
)
def test_signed_prefix_spellings_never_reach_the_upstream_unsigned(
    edge: Edge, suffix: str, status: int
) -> None:
    before = len(edge.upstream.requests())
    assert edge.get(f"/challenges/partial{suffix}").status == status
    assert edge.upstream.requests()[before:] == []


def _open_events(
    edge: Edge, slug: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """The upstream's event stream opened through the edge, its 200 answer's headers read;
    the caller closes the connection (and releases the upstream's last event)."""
    edge.upstream.reset_sse()
    connection = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        connection.request("GET", f"/challenges/{slug}{UpstreamServer.SSE_PATH}")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
    except BaseException:
        connection.close()
        raise
    return connection, response


def test_server_sent_events_stream_through_unbuffered(edge: Edge) -> None:
    upstream = edge.upstream
    connection, response = _open_events(edge, "open")
    try:
        received = b""
        while b"data: event-0\n\n" not in received:
            chunk = response.read1(65536)
            assert chunk, "stream ended before the first event"
            received += chunk
        # The first event arrived while the upstream was still holding back the last one.
        first_seen_before_last_sent = not upstream.sse_last_sent.is_set()
        upstream.sse_release.set()
        received += response.read()
    finally:
        upstream.sse_release.set()
        connection.close()
    assert first_seen_before_last_sent
    events = [line for line in received.decode().splitlines() if line.startswith("data: ")]
    assert events == [f"data: event-{i}" for i in range(UpstreamServer.SSE_EVENTS)]


def test_a_stream_is_cut_when_the_challenges_timeout_ends(tmp_path: Path) -> None:
    """The route timeout covers the whole answer, streamed or not (docs/miners.md): a
    stream still open when it ends is cut, and what the upstream holds back never arrives."""

    def brief(port: int) -> tuple[EdgeChallenge, ...]:
        return (EdgeChallenge("brief", "127.0.0.1", port, _limits(timeout=1)),)

    with _edge_with_upstream(tmp_path, brief) as edge:
        upstream = edge.upstream
        connection, response = _open_events(edge, "brief")
        try:
            received = b""
            # Never releasing the last event: the stream must end on Envoy's timeout,
            # well before the upstream's own bound on holding it back.
            with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
                while chunk := response.read1(65536):
                    received += chunk
            cut_before_the_last_event = not upstream.sse_last_sent.is_set()
        finally:
            upstream.sse_release.set()
            connection.close()
    assert b"data: event-0\n\n" in received
    assert cut_before_the_last_event
    last = UpstreamServer.SSE_EVENTS - 1
    assert f"data: event-{last}".encode() not in received


@contextlib.contextmanager
def _draining(
    workdir: Path, min_seconds: float, timeout: float
) -> Iterator[tuple[Edge, subprocess.Popen[str]]]:
    """A real Envoy (no challenges) being drained by the real ``platform edge drain``; yields
    once Envoy is seen draining (its answers carry ``connection: close``). The caller waits
    for the command; it is killed if still running on the way out. Envoy drains as the
    chart runs it: every answer closes its connection from the start (Envoy's default,
    ``gradual``, closes a growing share of them over ``--drain-time-s``)."""
    immediate = ("--drain-strategy", "immediate")
    with _edge_with_upstream(workdir, lambda port: (), immediate) as edge:
        assert "connection" not in edge.get("/nowhere").headers
        admin = f"{edge.envoy.admin_host}:{edge.envoy.admin_port}"
        draining = subprocess.Popen(
            [str(VENV_BIN / "platform"), "edge", "drain", "--admin", admin,
             "--min-seconds", str(min_seconds), "--timeout", str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while edge.get("/nowhere").headers.get("connection") != "close":
                assert draining.poll() is None, draining.communicate()
                assert time.monotonic() < deadline, "Envoy never started draining"
                time.sleep(0.05)
            yield edge, draining
        finally:
            if draining.poll() is None:
                draining.kill()
                draining.wait()


def test_a_drain_ends_when_envoy_stops(tmp_path: Path) -> None:
    """``platform edge drain`` (the chart's preStop hook) returns 0 once Envoy is gone, even
    inside its --min-seconds wait: nothing can be in flight through a stopped Envoy."""
    with _draining(tmp_path, min_seconds=60, timeout=120) as (edge, draining):
        edge.envoy.stop()
        out, err = draining.communicate(timeout=30)
    assert draining.returncode == 0, err
    assert out.startswith("drained: Envoy stopped after "), out


def test_a_drain_waits_for_an_envoy_slow_to_answer(tmp_path: Path) -> None:
    """An Envoy that does not answer for a while (here: stopped with SIGSTOP, so that its
    sockets still accept) is not taken for a stopped one: the drain keeps waiting."""
    with _draining(tmp_path, min_seconds=8, timeout=60) as (edge, draining):
        assert edge.envoy.process is not None
        edge.envoy.process.send_signal(signal.SIGSTOP)
        try:
            # Longer than the drain's 2 s per poll: at least one poll times out.
            time.sleep(3)
            assert draining.poll() is None, draining.communicate()
        finally:
            edge.envoy.process.send_signal(signal.SIGCONT)
        out, err = draining.communicate(timeout=30)
    assert draining.returncode == 0, err
    assert out.startswith("drained: no request in flight after "), out


def test_a_drain_fails_when_envoy_answers_nothing_until_its_timeout(tmp_path: Path) -> None:
    with _draining(tmp_path, min_seconds=4, timeout=4) as (edge, draining):
        assert edge.envoy.process is not None
        edge.envoy.process.send_signal(signal.SIGSTOP)
        try:
            out, err = draining.communicate(timeout=30)
        finally:
            edge.envoy.process.send_signal(signal.SIGCONT)
    assert draining.returncode == 1, out
    assert err.startswith("platform edge drain: Envoy's admin API at http://127.0.0.1:"), err
    assert err.endswith(" stopped answering\n"), err


# ---------------------------------------------------------------------------------------------
# Bypass corpus: spellings of the refused routes that must never reach the challenge

_BYPASS_SUFFIXES = (
    "/internal",
    "/internal/",
    "/internal/x",
    "/INTERNAL",
    "/Internal/x",
    "/iNtErNaL",
    "//internal",
    "///internal//x",
    "/./internal",
    "/x/../internal",
    "/x/y/../../internal",
    "/%2e/internal",
    "/x/%2e%2e/internal",
    "/x/%2E%2E/internal",
    "/x/.%2e/internal",
    "/%2e%2e/open/internal",
    "/%69nternal",
    "/%49NTERNAL",
    "/int%65rnal",
    "/%69%6e%74%65%72%6e%61%6c",
    "%2finternal",
    "%2Finternal",
    "/x%2f..%2finternal",
    "/x/..%2finternal",
    "%5cinternal",
    "%5Cinternal",
    "/x/..%5cinternal",
    "\\internal",
    "/x\\..\\internal",
    "/internal;x=1",
    "/internal;",
    "/INTERNAL;jsessionid=1",
    "/internal/..;/internal",
    "/x/..;/internal",
    "/internal.",
    "/internal..",
    "/internal%2e",
    "/internal%20",
    "/internal%09",
    "/internal%00",
    "/internal%3b",
    "/internal?x=1",
    "/internal?/../x",
    "/internal#frag",
    "/x#/../../internal",
    "/%3f/../internal",
    "/./INTERNAL/./",
    "/./%2e/x/..//InTeRnAl;a=b",
    "/x/%2E./%69NTERNAL/",
    "/%2569nternal",
    "/%%36%39nternal",
    "/%25%36%39nternal",
    "/x/%c0%ae%c0%ae/internal",
    "/x/%e0%80%ae%e0%80%ae/internal",
    "/x%c0%af..%c0%afinternal",
    "/%zzinternal/../internal",
    "/;/internal",
    "/;jsessionid=1/INTERNAL",
    "/%3b/internal",
    "/%3Bjsessionid=1/debug..",
    "/%20/internal",
    "/%20%20/health;x",
    "/%09internal",
    "/%00/internal",
    "/%7finternal",
    "/.../internal",
    "/x/.%2e./internal",
    "/.%20/internal",
    "/%2E%20/internal",
    "/..%20/Admin",
    "/x/%2E%2E%20/%68ealth",
    "/a/b/..%20/..%20/internal",
    "/.%20;/admin",
    "/%2e;/internal",
    "/%2e%2e;x/internal",
    "/x/%2e%2e;x/internal",
    "/.%3b/internal",
    "/..%3Bx/%68ealth",
    "/challenges/open/internal",
    "/CHALLENGES/OPEN/health",
    "/challenges/open;x/internal",
    "/x/%2e%2e/challenges/open/internal",
    "/health",
    "/HEALTH/",
    "/health;x",
    "/health.",
    "/%68ealth",
    "//health//",
    "\\health",
    "/version",
    "/Version.json",
    "/%76ersion",
    "/x/../version",
    "/version%2F",
    "/./version/.",
    "/admin",
    "/ADMIN/x",
    "/%61dmin",
    "/admin;a",
    "/debug.",
)
BYPASS_CORPUS = (
    *(f"/challenges/open{suffix}" for suffix in _BYPASS_SUFFIXES),
    "/CHALLENGES/OPEN/INTERNAL",
    "/challenges/OPEN/internal",
    "/challenges/open/..;/open/internal",
    "/challenges/x/../open/internal",
    "//challenges//open//internal",
    "http://127.0.0.1/challenges/open/internal",
    "http://127.0.0.1/challenges/open/%69nternal",
    "http://evil.example/challenges/open/health",
    "/challenges/open/internal x",
    "/challenges/open/internal\tx",
)


def _looks_internal(received_path: str) -> bool:
    """Whether a path an upstream received would, under lenient server rules, be refused.

    Decodes repeatedly, treats backslashes as slashes, drops matrix parameters, trailing dots
    and suffixes, resolves dot segments, ignores case, and strips a leftover
    ``/challenges/{slug}`` prefix.
    """
    path = received_path.split("?", 1)[0].split("#", 1)[0]
    for _ in range(3):
        path = urllib.parse.unquote(path, errors="replace")
    path = path.replace("\\", "/").lower()
    segments: list[str] = []
    for raw in path.split("/"):
        segment = raw.split(";", 1)[0].strip(" \t\x00")
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", ".") and segment.strip("."):
            segments.append(segment.rstrip(".").split(".", 1)[0] or segment)
    if len(segments) >= 2 and segments[0] == "challenges":
        segments = segments[2:]
    return bool(segments) and segments[0] in BLOCKED_NAMES


@pytest.mark.parametrize(
    ("path", "internal"),
    [
        ("/internal", True),
        ("/x/..;/INTERNAL", True),
        ("/%2569nternal.json", True),
        ("/x\\..\\health;a", True),
        ("/;x/%20/.../internal", True),
        ("/challenges/open/version", True),
        ("/internals", False),
        ("/api/health", False),
        ("/", False),
    ],
)
def test_bypass_detector_recognizes_internal_paths(path: str, internal: bool) -> None:
    assert _looks_internal(path) is internal


def test_bypass_corpus_is_large_and_distinct() -> None:
    assert len(set(BYPASS_CORPUS)) == len(BYPASS_CORPUS) >= 40


@pytest.mark.parametrize("target", BYPASS_CORPUS, ids=[repr(t) for t in BYPASS_CORPUS])
def test_bypass_spelling_is_refused(edge: Edge, target: str) -> None:
    before = len(edge.upstream.requests())
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = raw_request_bytes(edge.port, request.encode("latin-1"))
    assert response.status in (400, 403, 404), (response.status, response.body)
    assert edge.upstream.paths()[before:] == []


# Generated spellings: the listed corpus above, recombined. Seeded, so every run sends the
# same requests; a failure names the request-target to add to the corpus.
_SEPARATORS = (
    "/",
    "/",
    "/",
    "//",
    "/./",
    "/x/../",
    "/%2e/",
    "/.;/",
    "/x/..;/",
    "\\",
    "/%5c",
    "%2f",
    "/;/",
    "/;x=1/",
    "/%20/",
    "/%09/",
    "/.../",
    "/%2e%2e%2e/",
    "/x;/../",
    "/%3b/",
    "/~/../",
)
_LEADS = ("", "", "", "%20", "%09", ";", "%3b", ".", "%2e", "~", "%00")
_ENDINGS = (
    "",
    "",
    "",
    "/",
    "/x",
    ".",
    "..",
    ";a=b",
    ";",
    "%2e",
    "%20",
    "%09",
    "%00",
    "?a=/x",
    "#x",
    ".json",
    "/.",
    "/..",
    "%3b",
    "%3F",
    "%23",
    "~",
    "/%2e%2e",
)


def _spell(rng: random.Random, word: str) -> str:
    """``word`` with each character kept, case-flipped, percent-encoded (either case, or
    doubly) or written as an overlong UTF-8 sequence."""
    out = []
    for char in word:
        roll = rng.random()
        if roll < 0.6:
            out.append(char)
        elif roll < 0.75:
            out.append(char.swapcase())
        elif roll < 0.85:
            out.append(f"%{ord(char):02X}")
        elif roll < 0.95:
            out.append(f"%{ord(char):02x}")
        elif roll < 0.975:
            out.append(f"%25{ord(char):02X}")
        else:
            out.append(f"%c1%{0x80 | (ord(char) & 0x3F):02x}")
    return "".join(out)


def _generated_bypass_targets(count: int, seed: int = 20261122) -> list[str]:
    rng = random.Random(seed)
    targets = []
    for _ in range(count):
        root = rng.choice(_SEPARATORS) + _spell(rng, "challenges")
        if rng.random() < 0.2:
            root += rng.choice(_SEPARATORS) + "x" + rng.choice(_SEPARATORS) + ".."
        root += rng.choice(_SEPARATORS) + _spell(rng, "open")
        name = _spell(rng, rng.choice(sorted(BLOCKED_NAMES)))
        target = root + rng.choice(_SEPARATORS) + rng.choice(_LEADS) + name
        target += rng.choice(_ENDINGS)
        if rng.random() < 0.2:
            target = rng.choice(("http://127.0.0.1", "http://a")) + "/" + target.lstrip("/")
        targets.append(target)
    return targets


def _send_all(edge: Edge, targets: list[str]) -> tuple[list[tuple[str, list[str]]], Counter[int]]:
    """Each target as one request: the ones whose upstream request looked internal (with
    what the upstream received), and how often each status was answered."""
    reached: list[tuple[str, list[str]]] = []
    statuses: Counter[int] = Counter()
    for target in targets:
        before = len(edge.upstream.paths())
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        statuses[raw_request_bytes(edge.port, request.encode("latin-1")).status] += 1
        received = edge.upstream.paths()[before:]
        if any(_looks_internal(path) for path in received):
            reached.append((target, received))
    return reached, statuses


def test_generated_spellings_never_reach_the_upstream_as_internal(edge: Edge) -> None:
    targets = _generated_bypass_targets(400)
    assert len(set(targets)) > 350
    reached, statuses = _send_all(edge, targets)
    assert reached == []
    # Every kind of answer occurs: refusals of each sort, and spellings the edge routes to
    # public paths, so the check above looked at real upstream traffic too.
    assert {200, 400, 403, 404} <= set(statuses), statuses


# Mutated spellings: the plain route with one to three tokens inserted anywhere after
# ``/challenges`` and a few letters case-flipped or percent-encoded. Closer to the plain route
# than the generated ones above, so more of them reach the upstream. Seeded.
_MUTATION_TOKENS = (
    *("/", "//", "/./", "/../", "/x/../", "/;/", "/%3b/", "/%3Bx/", "/.;/", "/..;/", "/%20/"),
    *(";", ";a", "%3b", "%3B", ".", "..", "%2e", "%2E", "%2e%2e", "..;", "~", "%7e"),
    *(" ", "%20", "\t", "%09", "%00", "%0d%0a", "%2f", "%2F", "%5c", "\\", "?", "#"),
    *("%3f", "%23", "%25", "+", "%2b", "&", "=", ",", ":", "%3a", "@", "!", "$", "*"),
    *("%c0%af", "%c0%ae", "%ef%bc%8f", "%e2%80%8b", "%c2%a0", "%ff", "%u0069"),
    # Dot segments Envoy does not resolve, and the public prefix again.
    *("/%2e;/", "/%2e%2e;x/", "/.%20/", "/..%20/", "/.%3b/", "/%2e%2e%3Bx/", "/challenges/open/"),
)


def _mutated_bypass_targets(count: int, seed: int = 7919) -> list[str]:
    rng = random.Random(seed)
    targets = []
    for _ in range(count):
        target = "/challenges/open/" + rng.choice(sorted(BLOCKED_NAMES))
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(len("/challenges"), len(target))
            target = target[:at] + rng.choice(_MUTATION_TOKENS) + target[at:]
        for _ in range(rng.randint(0, 2)):
            at = rng.randrange(len(target))
            char = target[at]
            if char.isalpha():
                spelled = rng.choice((char.swapcase(), f"%{ord(char):02x}", f"%{ord(char):02X}"))
                target = target[:at] + spelled + target[at + 1 :]
        targets.append(target)
    return targets


def test_mutated_spellings_never_reach_the_upstream_as_internal(edge: Edge) -> None:
    targets = _mutated_bypass_targets(1000)
    assert len(set(targets)) > 900
    reached, statuses = _send_all(edge, targets)
    assert reached == []
    assert {200, 400, 403, 404} <= set(statuses), statuses


def test_upstream_never_received_an_internal_route(edge: Edge) -> None:
    received = edge.upstream.paths()
    assert received, "the module's tests should have reached the upstream"
    assert [path for path in received if _looks_internal(path)] == []


# ---------------------------------------------------------------------------------------------
# With an authorization service: identity headers and per-hotkey limits


@contextlib.contextmanager
def _authz_edge(
    workdir: Path, slug: str, limits: EdgeLimits, **settings: Any
) -> Iterator[tuple[Edge, StubAuthz]]:
    """An edge whose ext_authz is a :class:`StubAuthz`, with one challenge ``slug`` whose
    ``/submit`` is signed; ``settings`` are more :class:`EdgeSettings` fields."""

    def signed(port: int) -> tuple[EdgeChallenge, ...]:
        return (EdgeChallenge(slug, "127.0.0.1", port, limits, signed_path_prefixes=("/submit",)),)

    authz = StubAuthz()
    try:
        authz.start()
        with _edge_with_upstream(workdir, signed, authz_port=authz.port, **settings) as edge:
            yield edge, authz
    finally:
        authz.stop()


@pytest.fixture(scope="module")
def authz_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Edge, StubAuthz]]:
    with _authz_edge(
        tmp_path_factory.mktemp("authz-edge"), "hk", _limits(hotkey=HOTKEY_LIMIT)
    ) as pair:
        yield pair


def test_verified_hotkey_comes_from_authz_not_the_client(
    authz_edge: tuple[Edge, StubAuthz],
) -> None:
    edge, authz = authz_edge
    response = edge.get(
        "/challenges/hk/submit",
        method="POST",
        body=b'{"answer": 42}',
        headers={StubAuthz.TRUSTED_HOTKEY_HEADER: "5Alice", VERIFIED_HOTKEY_HEADER: "5Forged"},
    )
    assert response.status == 200, response.body
    assert response.json()["platform_headers"] == {VERIFIED_HOTKEY_HEADER: "5Alice"}
    check = authz.checks()[-1]
    assert check.context_extensions == {"slug": "hk"}
    assert check.authorization_metadata == f"Bearer {EDGE_TOKEN}"
    assert check.raw_body == b'{"answer": 42}'
    assert VERIFIED_HOTKEY_HEADER not in check.headers


def test_signed_body_over_the_limit_is_413_before_authz(
    authz_edge: tuple[Edge, StubAuthz],
) -> None:
    edge, authz = authz_edge
    checks_before = len(authz.checks())
    before = len(edge.upstream.requests())
    response = edge.get(
        "/challenges/hk/submit",
        method="POST",
        body=b"a" * (BODY_LIMIT + 1),
        headers={StubAuthz.TRUSTED_HOTKEY_HEADER: "5Dave"},
    )
    assert response.status == 413
    assert _json(response) == {"error": "payload_too_large"}
    assert len(authz.checks()) == checks_before
    assert edge.upstream.requests()[before:] == []


def test_authz_denials_keep_the_authz_answer(authz_edge: tuple[Edge, StubAuthz]) -> None:
    edge, _ = authz_edge
    before = len(edge.upstream.requests())
    response = edge.get("/challenges/hk/submit")
    assert response.status == 403
    assert json.loads(response.body) == {"error": "unauthorized"}
    assert edge.upstream.requests()[before:] == []


def test_hotkey_rate_limit_is_per_verified_hotkey(authz_edge: tuple[Edge, StubAuthz]) -> None:
    edge, _ = authz_edge

    def submit(hotkey: str) -> RawResponse:
        # Same client address throughout: only the verified hotkey tells the buckets apart.
        return edge.get("/challenges/hk/submit", headers={StubAuthz.TRUSTED_HOTKEY_HEADER: hotkey})

    for _ in range(HOTKEY_LIMIT):
        assert submit("5Bob").status == 200
    refused = submit("5Bob")
    assert refused.status == 429
    assert _json(refused) == {"error": "rate_limited"}
    assert int(refused.headers["retry-after"]) == 60 // HOTKEY_LIMIT
    for _ in range(HOTKEY_LIMIT):
        assert submit("5Carol").status == 200
    assert submit("5Carol").status == 429
    # Unsigned routes of the challenge are not charged to any hotkey.
    assert edge.get("/challenges/hk/public").status == 200


AUTHZ_IP_LIMIT = 3


def test_signed_routes_refuse_a_flood_from_one_address_before_asking_authz(
    tmp_path: Path,
) -> None:
    """Past ``authz_rate_per_ip_per_minute`` a client address gets 429 on a signed route
    and the authorization service is not asked: forged or unsigned floods cost the master
    nothing. Other addresses keep their own bucket; the challenge's public routes keep the
    challenge's own per-address limit."""
    with _authz_edge(
        tmp_path, "guarded", _limits(), authz_rate_per_ip_per_minute=AUTHZ_IP_LIMIT
    ) as (edge, authz):

        def submit(source: str, hotkey: str | None) -> RawResponse:
            headers = {StubAuthz.TRUSTED_HOTKEY_HEADER: hotkey} if hotkey else {}
            return edge.get("/challenges/guarded/submit", headers=headers, source_ip=source)

        # Signed (the stub accepts), each by another hotkey: only the address is shared.
        for n in range(AUTHZ_IP_LIMIT):
            assert submit("127.0.0.6", f"5Miner{n}").status == 200
        checks, received = len(authz.checks()), len(edge.upstream.requests())
        refused = submit("127.0.0.6", "5Another")
        assert refused.status == 429
        assert _json(refused) == {"error": "rate_limited"}
        assert int(refused.headers["retry-after"]) == 60 // AUTHZ_IP_LIMIT
        assert len(authz.checks()) == checks
        assert len(edge.upstream.requests()) == received

        # Unsigned requests (the stub refuses them) are charged to the same kind of bucket.
        for _ in range(AUTHZ_IP_LIMIT):
            assert submit("127.0.0.7", None).status == 403
        checks = len(authz.checks())
        assert submit("127.0.0.7", None).status == 429
        assert len(authz.checks()) == checks

        # Another address has its own bucket, and public routes are not charged to it.
        assert submit("127.0.0.8", "5Miner0").status == 200
        for _ in range(AUTHZ_IP_LIMIT + 1):
            assert edge.get("/challenges/guarded/x", source_ip="127.0.0.6").status == 200


# ---------------------------------------------------------------------------------------------
# Connections: slow clients, idle connections, HTTP/2 limits, large bodies

HEADERS_TIMEOUT_MS = 500
IDLE_TIMEOUT_MS = 1000
LARGE_BODY_LIMIT = 256 * 1024
# Generous bounds for what should take HEADERS_TIMEOUT_MS or IDLE_TIMEOUT_MS: a test that
# reaches one has found the timeout missing, not a slow machine.
CLOSE_WAIT_S = 15.0


@pytest.fixture(scope="module")
def strict_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """The edge with short header and idle timeouts (the defaults are 10 s and 5 min)."""

    def big(port: int) -> tuple[EdgeChallenge, ...]:
        return (EdgeChallenge("big", "127.0.0.1", port, _limits(body=LARGE_BODY_LIMIT)),)

    with _edge_with_upstream(
        tmp_path_factory.mktemp("strict-edge"),
        big,
        request_headers_timeout_ms=HEADERS_TIMEOUT_MS,
        idle_timeout_ms=IDLE_TIMEOUT_MS,
    ) as edge:
        yield edge


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(CLOSE_WAIT_S)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_client_too_slow_with_its_headers_gets_408_and_is_disconnected(
    strict_edge: Edge,
) -> None:
    before = len(strict_edge.upstream.requests())
    with socket.create_connection(("127.0.0.1", strict_edge.port), timeout=CLOSE_WAIT_S) as sock:
        # The request line and one header, then nothing: the end of the headers never comes.
        sock.sendall(b"GET /challenges/big/x HTTP/1.1\r\nhost: edge\r\n")
        received = _read_until_closed(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert json.loads(body) == {"error": "request_timeout"}
    assert strict_edge.upstream.requests()[before:] == []


def test_an_idle_connection_is_closed(strict_edge: Edge) -> None:
    with socket.create_connection(("127.0.0.1", strict_edge.port), timeout=CLOSE_WAIT_S) as sock:
        sock.sendall(b"GET /challenges/big/x HTTP/1.1\r\nhost: edge\r\n\r\n")
        # The answer, then the close: the connection is kept alive, and then idle.
        received = _read_until_closed(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), received
    assert json.loads(body)["path"] == "/x"


def _h2_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One HTTP/2 frame: type, flags, stream id, payload."""
    header = b""
    while len(header) < 9:
        chunk = sock.recv(9 - len(header))
        assert chunk, "the connection closed"
        header += chunk
    length = int.from_bytes(header[:3], "big")
    payload = b""
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        assert chunk, "the connection closed"
        payload += chunk
    return header[3], header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF, payload


def test_http2_clients_get_bounded_streams_and_windows(strict_edge: Edge) -> None:
    """What Envoy announces to an HTTP/2 (h2c) client: its SETTINGS frame and the
    connection window it opens (Envoy's defaults: 2^31 - 1 streams, 256 MiB windows)."""
    settings_frame, window_update = 0x4, 0x8
    max_concurrent_streams, initial_window_size = 0x3, 0x4
    with socket.create_connection(("127.0.0.1", strict_edge.port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        kind, flags, stream, payload = _h2_frame(sock)
        assert (kind, flags, stream) == (settings_frame, 0, 0)
        announced = {
            int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
            for i in range(0, len(payload), 6)
        }
        assert announced[max_concurrent_streams] == 100
        assert announced[initial_window_size] == 64 * 1024
        # Then (after acknowledging the client's SETTINGS) the connection's window update.
        for _ in range(3):
            kind, _, stream, payload = _h2_frame(sock)
            if kind == window_update:
                break
        assert (kind, stream) == (window_update, 0)
        # The connection window starts at 65,535 bytes; the update raises it to 1 MiB.
        assert 65_535 + int.from_bytes(payload, "big") == 1024 * 1024


def test_a_body_larger_than_the_connection_buffer_arrives_whole(strict_edge: Edge) -> None:
    """Connections buffer 32 KiB before flow control pushes back; a body up to the
    challenge's own limit still passes, byte for byte."""
    body = bytes(random.Random(7).randrange(256) for _ in range(LARGE_BODY_LIMIT))
    response = strict_edge.get("/challenges/big/upload", method="POST", body=body)
    assert response.status == 200, response.body
    assert response.json()["body_bytes"] == LARGE_BODY_LIMIT
    assert strict_edge.upstream.requests()[-1].body == body
    over = strict_edge.get("/challenges/big/upload", method="POST", body=body + b"!")
    assert over.status == 413


# ---------------------------------------------------------------------------------------------
# HTTPS


@pytest.fixture(scope="module")
def tls_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Edge, Path]]:
    """The edge serving HTTPS with a throwaway certificate; the certificate's path."""
    workdir = tmp_path_factory.mktemp("tls-edge")
    cert, key = self_signed_certificate(workdir)

    def challenges(port: int) -> tuple[EdgeChallenge, ...]:
        return (
            EdgeChallenge("open", "127.0.0.1", port, _limits(), blocked_path_prefixes=("/admin",)),
        )

    with _edge_with_upstream(
        workdir, challenges, tls_cert_file=str(cert), tls_key_file=str(key)
    ) as edge:
        yield edge, cert


def test_with_a_certificate_the_edge_serves_https(tls_edge: tuple[Edge, Path]) -> None:
    edge, cert = tls_edge
    before = len(edge.upstream.requests())
    status, body = https_get(edge.port, cert, "/challenges/open/api?x=1")
    assert status == 200, body
    assert json.loads(body)["path"] == "/api?x=1"
    [received] = edge.upstream.requests()[before:]
    assert received.headers["x-forwarded-proto"] == "https"
    # The edge's rules hold over TLS as over plain HTTP.
    for blocked in ("/challenges/open/internal/v1/get_weights", "/challenges/open/ADMIN/x"):
        assert https_get(edge.port, cert, blocked)[0] == 403
    assert len(edge.upstream.requests()) == before + 1


@pytest.mark.parametrize(
    ("offered", "chosen"), [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")]
)
def test_the_https_listener_prefers_http2_and_takes_http1(
    tls_edge: tuple[Edge, Path], offered: list[str], chosen: str
) -> None:
    edge, cert = tls_edge
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(offered)
    with (
        socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.selected_alpn_protocol() == chosen
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_http_on_the_https_listener_gets_no_answer(tls_edge: tuple[Edge, Path]) -> None:
    edge, _ = tls_edge
    before = len(edge.upstream.requests())
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"GET /challenges/open/api HTTP/1.1\r\nHost: edge\r\n\r\n")
        answer = _read_until_closed(sock)
    assert not answer.startswith(b"HTTP/")
    assert len(edge.upstream.requests()) == before
