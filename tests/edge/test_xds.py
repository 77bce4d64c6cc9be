"""The master's xDS server driving real Envoys.

Each test runs :class:`XdsServer` on a plain grpc.aio server on 127.0.0.1, real
Envoy processes started through :func:`render_bootstrap` and
:class:`EnvoyProcess`, and small upstreams, then checks what Envoy does with the
configuration: traffic through it, not only what the server believes it sent.
Resources are built by hand here (an EDS cluster per upstream, a listener whose
HTTP connection manager takes its routes over RDS via ADS), so these tests do
not depend on the translator.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import empty_pb2
from prometheus_client import REGISTRY

from master.edge.model import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEAP_BYTES,
    MIN_HEAP_BYTES,
    EdgeResources,
)
from master.edge.proxy import EnvoyProcess, render_bootstrap
from master.edge.xds import StreamInfo, XdsServer
from tests.edge.envoy_support import certificate_der, self_signed_certificate, served_certificate
from tests.support import waiting

DEBOUNCE = 0.05
# Bound of every poll for convergence (generous: the machine is shared).
CONVERGE_S = 10.0
ROUTES = "edge_routes"
MAIN_LISTENER = "edge_http"
EXTRA_LISTENER = "edge_http_extra"
LABELS = ("cluster", "endpoint", "listener", "route")
TOKEN = "test-edge-token"
TLS_SECRET = "edge-cert"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


# ---------------------------------------------------------------------------------------
# Resources


def cluster(name: str, connect_timeout_ms: int = 1000) -> Any:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.FromMilliseconds(connect_timeout_ms)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    return c


def assignment(name: str, port: int) -> Any:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    address = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    address.address = "127.0.0.1"
    address.port_value = port
    return cla


def listener(name: str, *, invalid: bool = False, tls_secret: str = "") -> Any:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = ROUTES
    hcm.rds.config_source.ads.SetInParent()
    hcm.rds.config_source.resource_api_version = config_source_pb2.V3
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    out = listener_pb2.Listener(name=name)
    out.address.socket_address.address = "127.0.0.1"
    out.address.socket_address.port_value = 0  # Envoy picks; read back from the admin API
    network = out.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager"
    )
    if invalid:
        # No network filter is configured by google.protobuf.Empty: Envoy rejects it.
        network.typed_config.Pack(empty_pb2.Empty())
    else:
        network.typed_config.Pack(hcm)
    if tls_secret:
        # HTTPS, the certificate fetched over ADS (SDS) by name.
        tls = tls_pb2.DownstreamTlsContext()
        sds = tls.common_tls_context.tls_certificate_sds_secret_configs.add(name=tls_secret)
        sds.sds_config.ads.SetInParent()
        sds.sds_config.resource_api_version = config_source_pb2.V3
        socket = out.filter_chains[0].transport_socket
        socket.name = "envoy.transport_sockets.tls"
        socket.typed_config.Pack(tls)
    return out


def tls_secret(name: str, cert: Path, key: Path) -> Any:
    secret = secret_pb2.Secret(name=name)
    secret.tls_certificate.certificate_chain.filename = str(cert)
    secret.tls_certificate.private_key.filename = str(key)
    return secret


def route_config(paths: Mapping[str, str], *, invalid_regex: bool = False) -> Any:
    rc = route_pb2.RouteConfiguration(name=ROUTES)
    host = rc.virtual_hosts.add(name="edge", domains=["*"])
    for prefix, target in sorted(paths.items()):
        route = host.routes.add()
        route.match.prefix = prefix
        route.route.cluster = target
    if invalid_regex:
        bad = host.routes.add()
        bad.match.safe_regex.regex = "(unclosed"
        bad.direct_response.status = 418
    return rc


def config(
    upstreams: Mapping[str, int],
    *,
    extra_paths: Mapping[str, str] | None = None,
    extra_listener: bool = False,
    invalid_regex: bool = False,
    invalid_listener: bool = False,
    connect_timeout_ms: int = 1000,
    certificate: tuple[Path, Path] | None = None,
) -> EdgeResources:
    """One cluster per upstream, routed at /<name>/; optionally a second listener, and
    HTTPS on the listeners with ``certificate`` (over SDS, as the secret ``TLS_SECRET``)."""
    paths = {f"/{name}/": name for name in upstreams}
    paths.update(extra_paths or {})
    listeners = [MAIN_LISTENER] + ([EXTRA_LISTENER] if extra_listener else [])
    secret = TLS_SECRET if certificate else ""
    return EdgeResources(
        clusters=tuple(cluster(n, connect_timeout_ms) for n in sorted(upstreams)),
        endpoints=tuple(assignment(n, p) for n, p in sorted(upstreams.items())),
        listeners=tuple(
            listener(n, invalid=invalid_listener, tls_secret=secret) for n in sorted(listeners)
        ),
        routes=(route_config(paths, invalid_regex=invalid_regex),),
        secrets=(tls_secret(TLS_SECRET, *certificate),) if certificate else (),
    )


# ---------------------------------------------------------------------------------------
# Processes and servers


async def start_upstream(name: str) -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=f"{name} {request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


async def start_xds(port: int = 0) -> tuple[XdsServer, grpc.aio.Server, int]:
    # An ACK timeout far beyond CONVERGE_S: convergence must never rest on it.
    xds = XdsServer(debounce=DEBOUNCE, debounce_cap=DEBOUNCE * 10, ack_timeout=60.0)
    server = grpc.aio.server()
    xds.add_to_server(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound != 0, f"cannot listen on 127.0.0.1:{port}"
    await server.start()
    return xds, server, bound


@dataclass
class Edge:
    tmp: Path
    xds: XdsServer
    server: grpc.aio.Server
    port: int
    upstreams: dict[str, int]
    envoys: dict[str, EnvoyProcess] = field(default_factory=dict)
    streams_before: float = 0.0

    def base(self, **kwargs: Any) -> EdgeResources:
        return config({"a": self.upstreams["a"]}, **kwargs)

    def with_b(self, **kwargs: Any) -> EdgeResources:
        return config(self.upstreams, extra_listener=True, **kwargs)

    async def start_envoy(self, node_id: str) -> EnvoyProcess:
        bootstrap = render_bootstrap(
            node_id=node_id,
            admin_host="127.0.0.1",
            admin_port=0,
            xds_host="127.0.0.1",
            xds_port=self.port,
            edge_token=TOKEN,
        )
        envoy = EnvoyProcess(
            bootstrap, work_dir=self.tmp / node_id, log_level="warning", concurrency=1
        )
        self.envoys[node_id] = envoy
        await envoy.start()
        await envoy.wait_ready(timeout=CONVERGE_S)
        return envoy


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    runners: list[web.AppRunner] = []
    upstreams: dict[str, int] = {}
    for name in ("a", "b"):
        runner, port = await start_upstream(name)
        runners.append(runner)
        upstreams[name] = port
    xds, server, port = await start_xds()
    env = Edge(tmp_path, xds, server, port, upstreams, streams_before=streams_gauge())
    await xds.publish_now(env.base())
    try:
        yield env
    finally:
        for envoy in env.envoys.values():
            await envoy.stop(grace=5.0)
        await env.xds.close()
        await env.server.stop(0)
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def envoy(edge: Edge) -> EnvoyProcess:
    return await edge.start_envoy("edge-1")


# ---------------------------------------------------------------------------------------
# Observations


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def streams_gauge() -> float:
    return sample("platform_xds_streams")


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    await waiting.eventually(check, what, CONVERGE_S, poll=0.02)


async def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body through Envoy; (0, error) when the listener is not there."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


async def listener_ports(envoy: EnvoyProcess) -> dict[str, int]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{envoy.admin_url}/listeners?format=json") as response,
    ):
        body = await response.json()
    return {
        status["name"]: status["local_address"]["socket_address"]["port_value"]
        for status in body.get("listener_statuses", [])
    }


async def port_of(envoy: EnvoyProcess, name: str) -> int:
    ports: dict[str, int] = {}

    async def listed() -> bool:
        ports.update(await listener_ports(envoy))
        return ports.get(name, 0) != 0

    await eventually(listed, f"listener {name} bound by Envoy")
    return ports[name]


async def serves(port: int, path: str, status: int, body_start: str = "") -> None:
    async def check() -> bool:
        got_status, body = await http_get(port, path)
        return got_status == status and body.startswith(body_start)

    await eventually(check, f"GET {path} on :{port} answers {status} {body_start!r}")


def stream_of(xds: XdsServer, node_id: str) -> StreamInfo | None:
    found = [s for s in xds.streams() if s.node_id == node_id]
    return found[-1] if found else None


def current(xds: XdsServer, node_id: str) -> StreamInfo:
    stream = stream_of(xds, node_id)
    assert stream is not None, f"{node_id} is not connected"
    return stream


async def settled(xds: XdsServer, node_id: str) -> StreamInfo:
    """Wait until the server has nothing left to push to, or await from, ``node_id``."""

    async def check() -> bool:
        stream = stream_of(xds, node_id)
        return stream is not None and stream.settled_version == xds.version

    await eventually(check, f"{node_id}'s stream is settled on version {xds.version}")
    return current(xds, node_id)


async def converged(xds: XdsServer, node_id: str) -> StreamInfo:
    """Wait until ``node_id`` has accepted the served version of every type."""

    async def check() -> bool:
        stream = stream_of(xds, node_id)
        wanted = xds.type_versions()
        return (
            stream is not None
            and stream.settled_version == xds.version
            and all(stream.types[label].acked_version == wanted[label] for label in LABELS)
        )

    await eventually(check, f"{node_id} holds every type of version {xds.version}")
    return current(xds, node_id)


def pushed_types(stream: StreamInfo, since: int) -> list[str]:
    return [push.type for push in stream.pushes[since:]]


async def published_after(xds: XdsServer, served: str) -> None:
    async def published() -> bool:
        return xds.version != served

    await eventually(published, "the new configuration is published after the debounce")


async def change(xds: XdsServer, resources: EdgeResources) -> None:
    """``set_resources``, then wait for the debounced publication."""
    served = xds.version
    xds.set_resources(resources)
    await published_after(xds, served)


# ---------------------------------------------------------------------------------------
# Tests


async def test_first_config_is_served(edge: Edge, envoy: EnvoyProcess) -> None:
    assert stat.S_IMODE(os.stat(envoy.config_path).st_mode) == 0o600
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)

    await serves(port, "/a/hello", 200, "a /a/hello")
    assert (await http_get(port, "/nowhere"))[0] == 404

    assert pushed_types(stream, 0) == ["cluster", "endpoint", "listener", "route"]
    for label in LABELS:
        assert stream.types[label].acks >= 1
        assert stream.types[label].nacks == 0
    assert stream.types["endpoint"].resource_names == ("a",)
    assert stream.types["route"].resource_names == (ROUTES,)
    assert streams_gauge() == edge.streams_before + 1


async def test_addition_then_removal_are_ordered_make_before_break(
    edge: Edge, envoy: EnvoyProcess
) -> None:
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)
    await serves(port, "/a/x", 200, "a ")
    assert (await http_get(port, "/b/x"))[0] == 404

    # Addition: a cluster, its endpoints, a second listener, a route.
    before = len(stream.pushes)
    await change(edge.xds, edge.with_b())
    stream = await converged(edge.xds, "edge-1")
    await serves(port, "/b/x", 200, "b /b/x")
    extra_port = await port_of(envoy, EXTRA_LISTENER)
    await serves(extra_port, "/b/y", 200, "b /b/y")
    assert pushed_types(stream, before) == ["cluster", "endpoint", "listener", "route"]

    # Removal: routes first, clusters last.
    before = len(stream.pushes)
    await change(edge.xds, edge.base())
    stream = await converged(edge.xds, "edge-1")
    await serves(port, "/b/x", 404)
    await serves(port, "/a/x", 200, "a ")
    assert pushed_types(stream, before) == ["route", "listener", "endpoint", "cluster"]
    assert EXTRA_LISTENER not in await listener_ports(envoy)
    # The last word on each type is the new configuration alone.
    last = {push.type: push for push in stream.pushes}
    assert last["cluster"].resources == ("a",)
    assert last["listener"].resources == (MAIN_LISTENER,)


async def test_rejected_config_is_not_pushed_again(edge: Edge, envoy: EnvoyProcess) -> None:
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)
    await serves(port, "/a/x", 200, "a ")
    good_route = stream.types["route"].acked_version
    nacks_before = sample("platform_xds_nacks_total", type="route")

    await change(edge.xds, edge.base(invalid_regex=True))
    bad_route = edge.xds.type_versions()["route"]

    async def rejected() -> bool:
        seen = stream_of(edge.xds, "edge-1")
        return seen is not None and seen.types["route"].nacks == 1

    await eventually(rejected, "Envoy NACKs the route config with an invalid regex")
    stream = await settled(edge.xds, "edge-1")
    route = stream.types["route"]
    assert route.nacked_version == bad_route
    assert route.acked_version == good_route
    assert route.nack_message
    assert sample("platform_xds_nacks_total", type="route") == nacks_before + 1
    route_pushes = route.pushes

    # Nothing is pushed again: the same resources again, and a few debounce periods.
    edge.xds.set_resources(edge.base(invalid_regex=True))
    await edge.xds.flush()
    await asyncio.sleep(DEBOUNCE * 6)
    stream = await settled(edge.xds, "edge-1")
    assert stream.types["route"].pushes == route_pushes
    assert sample("platform_xds_nacks_total", type="route") == nacks_before + 1
    # Envoy still serves the last good config.
    await serves(port, "/a/x", 200, "a ")

    # A change elsewhere goes out; the rejected route config still does not.
    before = len(stream.pushes)
    await change(edge.xds, edge.base(invalid_regex=True, connect_timeout_ms=2000))

    async def cluster_taken() -> bool:
        seen = stream_of(edge.xds, "edge-1")
        wanted = edge.xds.type_versions()["cluster"]
        return seen is not None and seen.types["cluster"].acked_version == wanted

    await eventually(cluster_taken, "Envoy takes the changed cluster")
    stream = await settled(edge.xds, "edge-1")
    # The changed cluster warms only with an EDS response, sent even though
    # its endpoints did not change.
    assert pushed_types(stream, before) == ["cluster", "endpoint"]
    assert stream.types["route"].pushes == route_pushes
    await serves(port, "/a/x", 200, "a ")

    # A later, different route config is pushed normally.
    await change(edge.xds, edge.base(extra_paths={"/c/": "a"}))
    stream = await converged(edge.xds, "edge-1")
    assert stream.types["route"].pushes == route_pushes + 1
    await serves(port, "/c/x", 200, "a /c/x")

    # The rejected version comes back with another change: still not offered again.
    before = len(stream.pushes)
    await change(edge.xds, edge.base(invalid_regex=True, connect_timeout_ms=3000))
    await eventually(cluster_taken, "Envoy takes the changed cluster")
    stream = await settled(edge.xds, "edge-1")
    assert pushed_types(stream, before) == ["cluster", "endpoint"]
    assert stream.types["route"].pushes == route_pushes + 1
    await serves(port, "/c/x", 200, "a /c/x")


async def test_rejected_listener_holds_back_the_routes_of_that_config(
    edge: Edge, envoy: EnvoyProcess
) -> None:
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)
    await serves(port, "/a/x", 200, "a ")
    nacks_before = sample("platform_xds_nacks_total", type="listener")
    before = len(stream.pushes)

    # A broken listener and a new route in one configuration.
    await change(edge.xds, edge.base(invalid_listener=True, extra_paths={"/c/": "a"}))

    async def rejected() -> bool:
        seen = stream_of(edge.xds, "edge-1")
        return seen is not None and seen.types["listener"].nacks == 1

    await eventually(rejected, "Envoy NACKs the listener")
    assert sample("platform_xds_nacks_total", type="listener") == nacks_before + 1
    await asyncio.sleep(DEBOUNCE * 6)
    stream = await settled(edge.xds, "edge-1")
    # The routes that came with the rejected listener are not pushed after it.
    assert pushed_types(stream, before) == ["listener"]
    assert stream.types["listener"].nack_message
    await serves(port, "/a/x", 200, "a ")
    assert (await http_get(port, "/c/x"))[0] == 404

    # Fixed: Envoy still holds that listener, so only the routes go out.
    await change(edge.xds, edge.base(extra_paths={"/c/": "a"}))
    stream = await converged(edge.xds, "edge-1")
    assert pushed_types(stream, before) == ["listener", "route"]
    await serves(port, "/c/x", 200, "a /c/x")


async def test_a_certificate_comes_over_sds_and_changes_without_the_listener(
    edge: Edge, envoy: EnvoyProcess
) -> None:
    """The HTTPS listener names its certificate; Envoy asks for it (SDS over the same ADS
    stream) and serves it. Another certificate is an SDS push alone, so the listener, whose
    updates drain connections, stays. One Envoy cannot load is NACKed, counted, not pushed
    again, and the certificate before it stays in use. New files moved over the old ones are
    taken with no push at all."""
    one = self_signed_certificate(edge.tmp, "one")
    (edge.tmp / "renewed").mkdir()
    two = self_signed_certificate(edge.tmp / "renewed", "two")
    await converged(edge.xds, "edge-1")
    await change(edge.xds, edge.base(certificate=one))
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)

    async def offers(port: int, cert: Path) -> None:
        async def check() -> bool:
            try:
                return await asyncio.to_thread(served_certificate, port) == certificate_der(cert)
            except OSError:
                return False

        await eventually(check, f"the listener on :{port} offers {cert.name}")

    await offers(port, one[0])
    assert stream.types["secret"].resource_names == (TLS_SECRET,)
    assert stream.types["secret"].acked_version == edge.xds.type_versions()["secret"]
    listener_pushes = stream.types["listener"].pushes

    before = len(stream.pushes)
    await change(edge.xds, edge.base(certificate=two))
    stream = await converged(edge.xds, "edge-1")
    await offers(port, two[0])
    assert pushed_types(stream, before) == ["secret"]
    assert stream.types["listener"].pushes == listener_pushes

    # A key that does not exist: rejected, and Envoy keeps the second certificate.
    nacks_before = sample("platform_xds_nacks_total", type="secret")
    before = len(stream.pushes)
    await change(edge.xds, edge.base(certificate=(two[0], edge.tmp / "missing.key")))

    async def rejected() -> bool:
        seen = stream_of(edge.xds, "edge-1")
        return seen is not None and seen.types["secret"].nacks == 1

    await eventually(rejected, "Envoy NACKs the secret whose key it cannot read")
    await asyncio.sleep(DEBOUNCE * 6)
    stream = await settled(edge.xds, "edge-1")
    assert pushed_types(stream, before) == ["secret"]
    assert "missing.key" in stream.types["secret"].nack_message
    assert sample("platform_xds_nacks_total", type="secret") == nacks_before + 1
    await offers(port, two[0])

    # With a new listener too, the certificate goes out before the listeners (make before
    # break), and the new listener takes it.
    before = len(stream.pushes)
    await change(edge.xds, edge.with_b(certificate=one))
    stream = await converged(edge.xds, "edge-1")
    assert pushed_types(stream, before) == ["cluster", "endpoint", "secret", "listener", "route"]
    await offers(port, one[0])
    await offers(await port_of(envoy, EXTRA_LISTENER), one[0])

    # Renewed where it is, new files moved over the old ones: Envoy watches the directory.
    (edge.tmp / "staged").mkdir()
    four_cert, four_key = self_signed_certificate(edge.tmp / "staged", "four")
    renewed = certificate_der(four_cert)
    assert renewed != certificate_der(one[0])
    four_key.replace(one[1])
    four_cert.replace(one[0])
    await offers(port, one[0])
    assert certificate_der(one[0]) == renewed


async def test_master_restart_keeps_traffic_and_versions(edge: Edge, envoy: EnvoyProcess) -> None:
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)
    await serves(port, "/a/x", 200, "a ")
    versions = {label: stream.types[label].acked_version for label in LABELS}
    served = edge.xds.version

    await edge.xds.close()
    await edge.server.stop(0)
    for _ in range(3):
        assert await http_get(port, "/a/x") == (200, "a /a/x")

    edge.xds, edge.server, _ = await start_xds(edge.port)
    await edge.xds.publish_now(edge.base())
    assert edge.xds.version == served
    stream = await converged(edge.xds, "edge-1")
    assert {label: stream.types[label].acked_version for label in LABELS} == versions
    # Same content, same versions: the reconnected Envoy is sent nothing.
    assert stream.pushes == ()
    await serves(port, "/a/x", 200, "a ")

    # And the new server drives it.
    await change(edge.xds, edge.with_b())
    await converged(edge.xds, "edge-1")
    await serves(port, "/b/x", 200, "b ")


async def test_two_envoys_converge_independently(edge: Edge, envoy: EnvoyProcess) -> None:
    second = await edge.start_envoy("edge-2")
    ports = [await port_of(e, MAIN_LISTENER) for e in (envoy, second)]
    for node in ("edge-1", "edge-2"):
        await converged(edge.xds, node)
    assert streams_gauge() == edge.streams_before + 2

    # A client that subscribes and then never reads nor answers.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        stuck = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE)
        request.node.id = "stuck"
        await stuck.write(request)

        async def stuck_is_served() -> bool:
            seen = stream_of(edge.xds, "stuck")
            return seen is not None and seen.types["cluster"].pushes == 1

        await eventually(stuck_is_served, "the stuck client got its clusters")
        assert streams_gauge() == edge.streams_before + 3

        await change(edge.xds, edge.with_b())
        for node in ("edge-1", "edge-2"):
            await converged(edge.xds, node)
        for port in ports:
            await serves(port, "/b/x", 200, "b ")
            await serves(port, "/a/x", 200, "a ")
        nodes = sorted(s.node_id for s in edge.xds.streams())
        assert nodes == ["edge-1", "edge-2", "stuck"]
        # Still waiting for its first ACK: nothing more was pushed to it.
        assert current(edge.xds, "stuck").types["cluster"].pushes == 1
        stuck.cancel()


async def test_burst_of_changes_is_one_push_per_type(edge: Edge, envoy: EnvoyProcess) -> None:
    stream = await converged(edge.xds, "edge-1")
    port = await port_of(envoy, MAIN_LISTENER)
    before = {label: stream.types[label].pushes for label in LABELS}
    served = edge.xds.version

    # 20 changes with no await in between: all inside one debounce window.
    for i in range(20):
        edge.xds.set_resources(edge.base(extra_paths={f"/v{i}/": "a"}, connect_timeout_ms=1000 + i))
    assert edge.xds.version == served  # not published yet
    final = config({"a": edge.upstreams["a"]}, extra_paths={"/v19/": "a"}, connect_timeout_ms=1019)

    await published_after(edge.xds, served)
    stream = await converged(edge.xds, "edge-1")
    after = {label: stream.types[label].pushes for label in LABELS}
    delta = {label: after[label] - before[label] for label in LABELS}
    assert delta == {"cluster": 1, "endpoint": 1, "listener": 0, "route": 1}
    await serves(port, "/v19/x", 200, "a ")
    assert (await http_get(port, "/v18/x"))[0] == 404

    # Identical content: no new version, nothing pushed.
    version = edge.xds.version
    edge.xds.set_resources(final)
    await edge.xds.flush()
    assert edge.xds.version == version
    await asyncio.sleep(DEBOUNCE * 4)
    assert len((await settled(edge.xds, "edge-1")).pushes) == len(stream.pushes)


async def test_debounce_cap_publishes_during_a_steady_stream_of_changes() -> None:
    xds = XdsServer(debounce=0.2, debounce_cap=0.4)
    try:
        await xds.publish_now(config({"a": 1}))
        first = xds.version
        for i in range(200):  # a change every 20 ms, each inside the debounce
            xds.set_resources(config({"a": 1}, extra_paths={f"/v{i}/": "a"}))
            if xds.version != first:
                break
            await asyncio.sleep(0.02)
        assert xds.version != first, "changes kept coming, so nothing was ever published"
    finally:
        await xds.close()


async def test_change_after_a_quiet_period_is_published_at_once() -> None:
    quiet = 1.0
    xds = XdsServer(debounce=quiet, debounce_cap=quiet * 2)
    try:
        await xds.publish_now(config({"a": 1}))
        first = xds.version
        await asyncio.sleep(quiet * 1.1)

        # Two changes in one turn of the event loop, after a quiet period: published
        # together on the next turns, without waiting for the debounce.
        xds.set_resources(config({"a": 1}, extra_paths={"/one/": "a"}))
        xds.set_resources(config({"a": 1}, extra_paths={"/two/": "a"}))
        assert xds.version == first  # set_resources never publishes in the caller's turn
        for _ in range(3):
            await asyncio.sleep(0)
        second = xds.version
        assert second != first, "a change after a quiet period waited for the debounce"
        xds.set_resources(config({"a": 1}, extra_paths={"/two/": "a"}))
        await xds.flush()
        assert xds.version == second, "the last of the two changes is the one published"

        # A change right after a publication is held for the debounce.
        xds.set_resources(config({"a": 1}, extra_paths={"/three/": "a"}))
        for _ in range(3):
            await asyncio.sleep(0)
        assert xds.version == second, "a change right after a publication was not debounced"
        await published_after(xds, second)
    finally:
        await xds.close()


async def test_stale_nonce_is_ignored(edge: Edge) -> None:
    """A client speaking the protocol by hand: responses decode as plain
    DiscoveryResponses, and a NACK of a superseded response changes nothing."""

    def request(version: str = "", nonce: str = "", error: str = "") -> Any:
        out = discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER_TYPE, version_info=version, response_nonce=nonce
        )
        out.node.id = "by-hand"
        if error:
            out.error_detail.message = error
        return out

    def names(response: Any) -> list[str]:
        clusters = []
        for packed in response.resources:
            item = cluster_pb2.Cluster()
            assert packed.Unpack(item)
            clusters.append(item.name)
        return clusters

    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(request())
        first = await call.read()
        assert first.type_url == CLUSTER_TYPE
        assert first.version_info == edge.xds.type_versions()["cluster"]
        assert names(first) == ["a"]
        await call.write(request(first.version_info, first.nonce))

        await change(edge.xds, edge.with_b())
        second = await call.read()
        assert names(second) == ["a", "b"]
        assert second.nonce != first.nonce
        await call.write(request(first.version_info, first.nonce, error="too late"))
        await call.write(request(second.version_info, second.nonce))

        async def acked() -> bool:
            seen = stream_of(edge.xds, "by-hand")
            return seen is not None and seen.types["cluster"].acked_version == (second.version_info)

        await eventually(acked, "the second response is ACKed")
        cluster_status = current(edge.xds, "by-hand").types["cluster"]
        assert (cluster_status.acks, cluster_status.nacks) == (2, 0)
        call.cancel()


async def test_delta_xds_is_refused_clearly(edge: Edge) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        # The stream is refused before any request is read; no request is written, so
        # the client cannot race the refusal (a write after it fails as INTERNAL).
        call = stub.DeltaAggregatedResources()
        code = await call.code()
        details = await call.details()
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "state-of-the-world" in (details or "")


def test_bootstrap_values_cannot_change_its_structure() -> None:
    token = 'to"ken\\with: yaml # chars'
    text = render_bootstrap(
        node_id='node "1"',
        admin_host="127.0.0.1",
        admin_port=0,
        xds_host="::1",
        xds_port=50051,
        edge_token=token,
    )
    doc = yaml.safe_load(text)
    assert doc["node"] == {"id": 'node "1"', "cluster": "platform-edge"}
    ads = doc["dynamic_resources"]["ads_config"]
    assert ads["grpc_services"][0]["initial_metadata"] == [
        {"key": "authorization", "value": f"Bearer {token}"}
    ]
    endpoint = doc["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    address = endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "::1", "port_value": 50051}
    # Envoy's overload manager: the defaults, and the heap budget's actions.
    overload = doc["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] == DEFAULT_MAX_CONNECTIONS
    heap = monitors["envoy.resource_monitors.fixed_heap"]
    assert heap["max_heap_size_bytes"] == DEFAULT_MAX_HEAP_BYTES
    actions = {a["name"]: a["triggers"][0]["threshold"]["value"] for a in overload["actions"]}
    assert actions == {
        "envoy.overload_actions.shrink_heap": 0.95,
        "envoy.overload_actions.stop_accepting_requests": 0.98,
    }
    for bad, message in (
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": True}, "max_connections"),
        ({"max_heap_bytes": MIN_HEAP_BYTES - 1}, "max_heap_bytes"),
        ({"max_heap_bytes": "1e9"}, "max_heap_bytes"),
        ({"edge_token": "a\nb"}, "HTTP header"),
    ):
        arguments: dict[str, Any] = {
            "node_id": "n",
            "admin_host": "127.0.0.1",
            "admin_port": 0,
            "xds_host": "127.0.0.1",
            "xds_port": 50051,
            "edge_token": "t" * 16,
            **bad,
        }
        with pytest.raises(ValueError, match=message):
            render_bootstrap(**arguments)
