"""The edge end to end: a real Envoy configured over xDS by a real master.

The master runs in this process (its event loop serves xDS and ext_authz); the
Envoy is a real process started on the bootstrap the master renders, and the
challenges' public APIs are the recording upstream of ``envoy_support``.
Requests go out from worker threads so the event loop keeps serving Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import field_mask_pb2
from prometheus_client import REGISTRY

from master.edge.model import VERIFIED_HOTKEY_HEADER, VERIFIED_UID_HEADER, EdgeResources
from master.edge.proxy import EnvoyProcess, active_requests, drain, render_bootstrap
from master.edge.xds import StreamInfo, XdsServer
from platform_common.chain import LocalSubnet
from platform_common.chain.local import dev_keypair
from platform_common.miner import signed_headers
from platform_network.v1 import registry_pb2
from tests.edge.envoy_support import (
    MountedSecret,
    RawResponse,
    UpstreamServer,
    certificate_der,
    https_get,
    raw_request,
    self_signed_certificate,
    served_certificate,
)
from tests.helpers import ACTIVE, INACTIVE, create, set_status
from tests.support.master import ADMIN, VENV_BIN, RunningMaster, start_master
from tests.support.ports import free_port

pytestmark = pytest.mark.process

EDGE_TOKEN = "edge-token-for-tests-0123456789"
MASTER_KEY = "//platform-test/master"
CONVERGE_SECONDS = 15.0


@dataclass
class Edge:
    tmp: Path
    database_url: str
    subnet_url: str
    master_port: int
    port: int
    upstream: UpstreamServer
    running: RunningMaster
    envoy: EnvoyProcess
    # More master settings for the next start_master().
    settings: dict[str, Any] = field(default_factory=dict)

    async def get(self, target: str, **kwargs: Any) -> RawResponse:
        return await asyncio.to_thread(raw_request, self.port, target, **kwargs)

    async def until(
        self, target: str, done: Callable[[RawResponse], bool], **kwargs: Any
    ) -> RawResponse:
        """Request ``target`` until ``done`` holds (the edge converged), bounded."""
        deadline = time.monotonic() + CONVERGE_SECONDS
        while True:
            answer = await self.get(target, **kwargs)
            if done(answer) or time.monotonic() > deadline:
                return answer
            await asyncio.sleep(0.05)

    async def start_master(self) -> None:
        self.running = await start_master(
            self.database_url,
            listen=f"127.0.0.1:{self.master_port}",
            chain=self.subnet_url,
            hotkey=MASTER_KEY,
            epochs=False,
            edge_listen=f"127.0.0.1:{self.port}",
            edge_token=EDGE_TOKEN,
            shim_endpoints_file=str(self.tmp / "placement.json"),
            **self.settings,
        )


async def _activate(edge: Edge, slug: str, **routes: Any) -> None:
    await create(
        edge.running.registry, slug, 0.1, routes=registry_pb2.PublicRoutes(public_port=80, **routes)
    )
    await set_status(edge.running.registry, slug, ACTIVE)


@pytest.fixture
async def edge(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Edge]:
    """A master with the edge on and an Envoy on its bootstrap; indirect parametrization
    passes more keyword arguments to ``render_bootstrap``."""
    subnet_path = tmp_path / "chain.json"
    LocalSubnet.create(subnet_path, netuid=1, neurons=8, validators=2, manual_blocks=True)
    upstream = UpstreamServer().start()
    address = f"127.0.0.1:{upstream.port}"
    (tmp_path / "placement.json").write_text(
        json.dumps({slug: {"public": address} for slug in ("echo", "vault", "other")})
    )
    master_port = free_port()
    edge = Edge(
        tmp=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'platform.db'}",
        subnet_url=f"local+file:{subnet_path}",
        master_port=master_port,
        port=free_port(),
        upstream=upstream,
        running=None,  # type: ignore[arg-type]
        envoy=EnvoyProcess(
            render_bootstrap(
                node_id="edge-test",
                admin_host="127.0.0.1",
                admin_port=0,
                xds_host="127.0.0.1",
                xds_port=master_port,
                edge_token=EDGE_TOKEN,
                **getattr(request, "param", {}),
            ),
            work_dir=tmp_path / "envoy",
            log_level="warning",
        ),
    )
    try:
        await edge.start_master()
        await edge.envoy.start()
        await edge.envoy.wait_ready(timeout=CONVERGE_SECONDS)
        yield edge
    finally:
        await edge.envoy.stop()
        if edge.running is not None:
            await edge.running.close()
        upstream.stop()


async def test_a_route_follows_the_registry_live(edge: Edge) -> None:
    await create(
        edge.running.registry, "echo", 0.1, routes=registry_pb2.PublicRoutes(public_port=80)
    )
    # DRAFT: not routed.
    assert (await edge.get("/challenges/echo/hello")).status == 404

    await set_status(edge.running.registry, "echo", ACTIVE)
    served = await edge.until("/challenges/echo/hello?x=1", lambda r: r.status == 200)
    assert served.status == 200, served.body
    assert served.json()["path"] == "/hello?x=1"

    # Updated live: a new blocked prefix is refused at the edge.
    await edge.running.registry.UpdateChallenge(
        registry_pb2.UpdateChallengeRequest(
            slug="echo",
            challenge=registry_pb2.ChallengeSpec(
                routes=registry_pb2.PublicRoutes(public_port=80, blocked_path_prefixes=["/hello"])
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["routes"]),
        ),
        metadata=ADMIN,
    )
    refused = await edge.until("/challenges/echo/hello", lambda r: r.status == 403)
    assert refused.status == 403
    arrived = edge.upstream.paths().count("/hello")
    assert (await edge.get("/challenges/echo/hello/again")).status == 403
    assert (await edge.get("/challenges/echo/other")).status == 200
    assert edge.upstream.paths().count("/hello") == arrived
    assert "/hello/again" not in edge.upstream.paths()

    await set_status(edge.running.registry, "echo", INACTIVE)
    gone = await edge.until("/challenges/echo/other", lambda r: r.status == 404)
    assert gone.status == 404


def _keep_alive_exchange(sock: socket.socket, target: str) -> int:
    """One request on an open connection; the answer's status (its body is read and dropped)."""
    sock.sendall(f"GET {target} HTTP/1.1\r\nhost: edge\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response.status


@pytest.mark.parametrize("edge", [{"max_connections": 2}], indirect=True)
async def test_envoy_holds_no_more_client_connections_than_its_bootstrap_allows(
    edge: Edge,
) -> None:
    await _activate(edge, "echo")
    assert (await edge.until("/challenges/echo/a", lambda r: r.status == 200)).status == 200
    target = "/challenges/echo/held"

    async def hold() -> socket.socket:
        """A connection served once (200) and kept alive; retried while Envoy still counts
        connections that the client side has closed already."""
        deadline = time.monotonic() + CONVERGE_SECONDS
        while True:
            sock = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
            try:
                if await asyncio.to_thread(_keep_alive_exchange, sock, target) == 200:
                    return sock
            except ConnectionError:
                pass
            sock.close()
            assert time.monotonic() < deadline, "Envoy accepted no connection"
            await asyncio.sleep(0.05)

    with contextlib.ExitStack() as held:
        # Two connections open: the cap is reached.
        first = held.enter_context(await hold())
        held.enter_context(await hold())
        served = edge.upstream.paths().count("/held")
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as third:
            # The kernel completes the handshake; Envoy closes the connection unread.
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                third.sendall(f"GET {target} HTTP/1.1\r\nhost: edge\r\n\r\n".encode())
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.to_thread(third.recv, 1024) == b""
        assert edge.upstream.paths().count("/held") == served
        # The held connections still work.
        assert await asyncio.to_thread(_keep_alive_exchange, first, target) == 200
    # Once Envoy has seen them closed, a new connection is served again.
    (await hold()).close()


async def test_a_challenge_slower_than_its_timeout_gets_a_safe_504(edge: Edge) -> None:
    await _activate(edge, "echo", request_timeout_seconds=1)
    assert (await edge.until("/challenges/echo/a", lambda r: r.status == 200)).status == 200
    late = await edge.get("/challenges/echo/slow?s=3")
    assert late.status == 504
    assert late.json() == {"error": "challenge_unavailable"}
    assert (await edge.get("/challenges/echo/slow?s=0")).status == 200


async def _in_flight(edge: Edge) -> int:
    async with aiohttp.ClientSession() as session:
        return await active_requests(session, edge.envoy.admin_url)


async def test_drain_waits_for_the_requests_in_flight_up_to_its_timeout(edge: Edge) -> None:
    await _activate(edge, "echo")
    assert (await edge.until("/challenges/echo/a", lambda r: r.status == 200)).status == 200
    slow = asyncio.create_task(edge.get("/challenges/echo/slow?s=3"))
    deadline = time.monotonic() + CONVERGE_SECONDS
    while await _in_flight(edge) != 1:
        assert time.monotonic() < deadline, "the slow request never reached Envoy"
        await asyncio.sleep(0.02)

    # Past its timeout the drain gives up and says how many requests it left in flight.
    given_up = await asyncio.to_thread(
        subprocess.run,
        [str(VENV_BIN / "platform"), "edge", "drain", "--admin", edge.envoy.admin,
         "--min-seconds", "0", "--timeout", "0.2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert given_up.returncode == 1, given_up.stderr
    assert given_up.stderr.startswith("platform edge drain: requests still in flight after")
    assert given_up.stderr.endswith("(--timeout): 1\n"), given_up.stderr
    # Otherwise it returns once none is left, and the request was answered, not cut.
    done = await drain(edge.envoy.admin_url, min_seconds=0, timeout=CONVERGE_SECONDS)
    assert (done.active, done.drained, done.exited) == (0, True, False)
    assert await _in_flight(edge) == 0
    assert (await slow).status == 200


async def test_envoy_keeps_the_last_config_while_the_master_is_down_then_converges(
    edge: Edge,
) -> None:
    await _activate(edge, "echo")
    assert (await edge.until("/challenges/echo/a", lambda r: r.status == 200)).status == 200
    xds = edge.running.master._xds
    assert xds is not None
    version = xds.version

    await edge.running.close()
    edge.running = None  # type: ignore[assignment]
    # The master is gone: Envoy serves on the config it has.
    for _ in range(5):
        assert (await edge.get("/challenges/echo/a")).status == 200

    await edge.start_master()
    restarted = edge.running.master._xds
    assert restarted is not None
    # Versions are hashes of the content: the same registry gives the same version.
    assert restarted.version == version
    await _activate(edge, "other")
    served = await edge.until("/challenges/other/b", lambda r: r.status == 200)
    assert served.status == 200
    assert (await edge.get("/challenges/echo/a")).status == 200
    assert any(s.node_id == "edge-test" for s in restarted.streams())


async def test_an_invalid_config_is_nacked_and_traffic_stays_on_the_last_good_one(
    edge: Edge,
) -> None:
    await _activate(edge, "echo")
    assert (await edge.until("/challenges/echo/a", lambda r: r.status == 200)).status == 200
    controller = edge.running.master.edge
    assert controller is not None
    translate = controller.translate

    def broken(state: Any) -> EdgeResources:
        resources = translate(state)
        routes = resources.routes[0].__class__()
        routes.CopyFrom(resources.routes[0])
        bad = routes.virtual_hosts[0].routes.add()
        bad.match.safe_regex.regex = "(unclosed"
        bad.direct_response.status = 200
        return EdgeResources(
            resources.clusters, resources.endpoints, resources.listeners, (routes,)
        )

    def nacks() -> float:
        return REGISTRY.get_sample_value("platform_xds_nacks_total", {"type": "route"}) or 0.0

    before = nacks()
    controller.translate = broken
    await _activate(edge, "other")
    deadline = time.monotonic() + CONVERGE_SECONDS
    while nacks() == before and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a metric
        await asyncio.sleep(0.05)
    assert nacks() == before + 1
    xds = edge.running.master._xds
    assert xds is not None
    stream = next(s for s in xds.streams() if s.node_id == "edge-test")
    assert "unclosed" in stream.types["route"].nack_message
    # The previous config stays in force: echo serves, other was never routed.
    assert (await edge.get("/challenges/echo/a")).status == 200
    assert (await edge.get("/challenges/other/a")).status == 404
    # Not pushed again in a loop.
    await asyncio.sleep(0.5)
    assert nacks() == before + 1

    # The next change translates correctly again and goes through.
    controller.translate = translate
    await _activate(edge, "vault")
    served = await edge.until("/challenges/vault/a", lambda r: r.status == 200)
    assert served.status == 200
    assert (await edge.get("/challenges/other/a")).status == 200


# -- miners signing requests ------------------------------------------------------------------

MINER_UID = 3


def _miner(uid: int = MINER_UID) -> Any:
    return dev_keypair("hotkey", uid)


async def _signed_edge(edge: Edge) -> None:
    await _activate(edge, "vault", signed_path_prefixes=["/submit"])
    ready = await edge.until("/challenges/vault/task", lambda r: r.status == 200)
    assert ready.status == 200


async def _post(edge: Edge, target: str, body: bytes, headers: dict[str, str]) -> RawResponse:
    return await edge.get(target, method="POST", body=body, headers=headers)


def _seen_by_upstream(edge: Edge, body: bytes) -> list[dict[str, str]]:
    return [r.headers for r in edge.upstream.requests() if r.body == body]


async def test_a_signed_request_reaches_the_challenge_with_the_verified_identity(
    edge: Edge,
) -> None:
    await _signed_edge(edge)
    miner = _miner()
    body = b'{"task_id": 1, "answer": 7}'
    target = "/challenges/vault/submit?round=2"
    headers = signed_headers(miner, "POST", target, body)
    # Whatever the client claims about itself is replaced by what the edge verified.
    headers[VERIFIED_HOTKEY_HEADER] = _miner(5).ss58_address
    headers[VERIFIED_UID_HEADER] = "5"
    answer = await _post(edge, target, body, headers)
    assert answer.status == 200, answer.body
    assert answer.json()["path"] == "/submit?round=2"
    seen = _seen_by_upstream(edge, body)
    assert len(seen) == 1
    assert seen[0][VERIFIED_HOTKEY_HEADER] == miner.ss58_address
    assert seen[0][VERIFIED_UID_HEADER] == str(MINER_UID)


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("unsigned", 401, "missing_signature"),
        ("forged", 401, "bad_signature"),
        ("tampered_body", 401, "bad_signature"),
        ("stale", 401, "stale"),
        ("unregistered", 403, "not_registered"),
    ],
)
async def test_bad_signed_requests_are_refused_at_the_edge(
    edge: Edge, case: str, status: int, reason: str
) -> None:
    await _signed_edge(edge)
    target = "/challenges/vault/submit"
    body = f'{{"case": "{case}"}}'.encode()
    headers: dict[str, str] = {}
    if case == "forged":
        # Signed by uid 4, claiming to be uid 3.
        headers = signed_headers(_miner(4), "POST", target, body)
        headers["X-Bittensor-Hotkey"] = _miner().ss58_address
    elif case == "tampered_body":
        headers = signed_headers(_miner(), "POST", target, b'{"case": "original"}')
    elif case == "stale":
        miner = _miner()
        old = time.time_ns() - 60 * 1_000_000_000
        from bittensor import http_auth

        headers = dict(http_auth.sign(miner, method="POST", path=target, body=body, nonce_ns=old))
    elif case == "unregistered":
        headers = signed_headers(dev_keypair("hotkey", 999), "POST", target, body)
    answer = await _post(edge, target, body, headers)
    assert answer.status == status, answer.body
    assert answer.headers.get("x-platform-auth-error") == reason
    assert answer.json()["reason"] == reason
    assert _seen_by_upstream(edge, body) == []


async def test_the_masters_per_address_limit_guards_its_signature_checks(edge: Edge) -> None:
    """``--edge-authz-rate-per-ip`` reaches Envoy through xDS: past it, a client address
    gets 429 on a signed route and the master's ext_authz is not asked."""
    await edge.running.close()
    edge.settings = {"edge_authz_rate_per_ip": 2}
    await edge.start_master()
    await _signed_edge(edge)
    target = "/challenges/vault/submit"

    def checked() -> float:
        value = REGISTRY.get_sample_value(
            "platform_authz_checks_total", {"decision": "missing_signature"}
        )
        return value or 0.0

    before = checked()
    for _ in range(2):
        refused = await _post(edge, target, b"{}", {})
        assert refused.status == 401, refused.body
    assert checked() == before + 2
    limited = await _post(edge, target, b"{}", {})
    assert limited.status == 429, limited.body
    assert limited.json() == {"error": "rate_limited"}
    assert checked() == before + 2


async def test_a_replayed_request_is_refused_with_409(edge: Edge) -> None:
    await _signed_edge(edge)
    target = "/challenges/vault/submit"
    body = b'{"replay": true}'
    headers = signed_headers(_miner(), "POST", target, body)
    first = await _post(edge, target, body, headers)
    assert first.status == 200, first.body
    again = await _post(edge, target, body, headers)
    assert again.status == 409, again.body
    assert again.json()["reason"] == "replayed"
    assert len(_seen_by_upstream(edge, body)) == 1


async def test_spoofed_identity_headers_never_reach_an_unsigned_route(edge: Edge) -> None:
    await _signed_edge(edge)
    spoofed = {
        VERIFIED_HOTKEY_HEADER: _miner().ss58_address,
        VERIFIED_UID_HEADER: str(MINER_UID),
        "X-Platform-Challenge": "vault",
    }
    answer = await edge.get("/challenges/vault/task?spoof=1", headers=spoofed)
    assert answer.status == 200
    seen = [r.headers for r in edge.upstream.requests() if r.path == "/task?spoof=1"]
    assert len(seen) == 1
    assert not any(name.startswith("x-platform-") for name in seen[0])


@pytest.mark.parametrize(
    ("metadata", "text"),
    [((), "Bearer <edge token>"), ((("authorization", "Bearer not-the-edge-token"),), "invalid")],
)
async def test_only_the_edge_token_reaches_xds_and_ext_authz(
    edge: Edge, metadata: tuple[tuple[str, str], ...], text: str
) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    stub = external_auth_pb2_grpc.AuthorizationStub(edge.running.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(external_auth_pb2.CheckRequest(), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert text in (info.value.details() or "")
    # The admin token is not the edge token either.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(external_auth_pb2.CheckRequest(), metadata=ADMIN)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Nor is Envoy's configuration served to anyone else.
    ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(edge.running.channel)
    for refused_metadata in (metadata, ADMIN):
        stream = ads.StreamAggregatedResources(metadata=refused_metadata)
        request = discovery_pb2.DiscoveryRequest(
            type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"
        )
        request.node.id = "intruder"
        with contextlib.suppress(grpc.aio.AioRpcError):  # the server may refuse first
            await stream.write(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_masters_certificate_puts_the_edge_on_https(edge: Edge) -> None:
    """``--edge-tls-cert`` and ``--edge-tls-key`` reach Envoy through xDS: after a restart
    with them, the same Envoy answers the same route over HTTPS, and no longer in plain HTTP."""
    cert, key = self_signed_certificate(edge.tmp)
    await _activate(edge, "echo")
    assert (await edge.until("/challenges/echo/a", lambda r: r.status == 200)).status == 200
    await edge.running.close()
    edge.settings = {"edge_tls_cert": str(cert), "edge_tls_key": str(key)}
    await edge.start_master()
    deadline = time.monotonic() + CONVERGE_SECONDS
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, body = await asyncio.to_thread(https_get, edge.port, cert, "/challenges/echo/a")
            break
        assert time.monotonic() < deadline, "the edge did not turn to HTTPS"
        await asyncio.sleep(0.05)
    assert status == 200, body
    assert json.loads(body)["path"] == "/a"
    with pytest.raises((OSError, http.client.HTTPException)):
        await edge.get("/challenges/echo/a")


async def _served(edge: Edge, cert: Path) -> None:
    """Wait until a new connection to the edge is offered ``cert``, bounded."""
    wanted = certificate_der(cert)
    deadline = time.monotonic() + CONVERGE_SECONDS
    got = b""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            got = await asyncio.to_thread(served_certificate, edge.port)
            if got == wanted:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the edge still offers another certificate than {cert.name}")


async def _envoy_stats(edge: Edge, pattern: str) -> dict[str, int]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"{edge.envoy.admin_url}/stats", params={"filter": pattern}) as response,
    ):
        text = await response.text()
    return {
        name: int(value)
        for name, _, value in (line.partition(": ") for line in text.splitlines())
        if value.isdigit()
    }


def _edge_stream(xds: XdsServer) -> StreamInfo:
    return next(s for s in xds.streams() if s.node_id == "edge-test")


async def test_a_renewed_certificate_reaches_new_connections_without_a_restart(
    edge: Edge,
) -> None:
    """Kubernetes renews a mounted Secret by swapping the ``..data`` symlink in its directory.
    Envoy watches that directory (the certificate comes over SDS) and offers the new
    certificate to new connections: the same Envoy process, nothing pushed by the master. A
    renewal to a pair Envoy cannot load is refused, and the certificate before it kept."""
    first, second, third = (self_signed_certificate(edge.tmp, n) for n in ("one", "two", "three"))
    mount = MountedSecret(edge.tmp / "edge-tls")
    mount.write(*first)
    await _activate(edge, "echo")
    await edge.running.close()
    edge.settings = {"edge_tls_cert": str(mount.cert), "edge_tls_key": str(mount.key)}
    await edge.start_master()
    await _served(edge, first[0])
    pid = edge.envoy.pid
    xds = edge.running.master._xds
    assert xds is not None
    deadline = time.monotonic() + CONVERGE_SECONDS
    while (stream := _edge_stream(xds)).settled_version != xds.version:
        assert time.monotonic() < deadline, "the edge's stream did not settle"
        await asyncio.sleep(0.05)
    assert stream.types["secret"].resource_names == ("edge-tls",)
    assert stream.types["secret"].acks == 1
    pushes = len(stream.pushes)
    # A connection opened before the renewal, kept alive across it.
    context = ssl.create_default_context(cafile=str(first[0]))
    kept = http.client.HTTPSConnection("127.0.0.1", edge.port, context=context, timeout=10)

    def get_on_kept() -> int:
        kept.request("GET", "/challenges/echo/a")
        answer = kept.getresponse()
        answer.read()
        return answer.status

    try:
        assert await asyncio.to_thread(get_on_kept) == 200
        mount.write(*second)
        await _served(edge, second[0])
        status, body = await asyncio.to_thread(
            https_get, edge.port, second[0], "/challenges/echo/a"
        )
        assert status == 200, body
        # Open connections keep the certificate they were made with.
        assert await asyncio.to_thread(get_on_kept) == 200
        assert kept.sock is not None
        assert kept.sock.getpeercert(binary_form=True) == certificate_der(first[0])
    finally:
        kept.close()

    # A renewal to a key that is not the certificate's is refused; the second pair stays.
    failed = "sds.edge-tls.key_rotation_failed"
    assert (await _envoy_stats(edge, failed))[failed] == 0
    mount.write(second[0], third[1])
    deadline = time.monotonic() + CONVERGE_SECONDS
    while (await _envoy_stats(edge, failed))[failed] == 0:
        assert time.monotonic() < deadline, "Envoy did not try the broken pair"
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(served_certificate, edge.port) == certificate_der(second[0])
    status, _ = await asyncio.to_thread(https_get, edge.port, second[0], "/challenges/echo/a")
    assert status == 200
    assert "Failed to reload certificates" in edge.envoy.log_tail(chars=100_000)

    # The next good renewal is taken.
    mount.write(*third)
    await _served(edge, third[0])
    assert edge.envoy.pid == pid
    assert len(_edge_stream(xds).pushes) == pushes
    # The expiry operators are told to alert on (the test certificates last two days).
    (expiry,) = (await _envoy_stats(edge, r"ssl\.certificate\.edge-tls\.expiration")).values()
    assert time.time() + 86400 < expiry <= time.time() + 2 * 86400
