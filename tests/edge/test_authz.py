"""ext_authz: signed miner requests checked over real gRPC, as Envoy sends them.

The requests are shaped like Envoy's (lowercase header map with pseudo-headers,
the path with its query string, the raw body as bytes) and signed with
``bittensor.http_auth`` by hotkeys of a simulated subnet read through the real SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, cast

import grpc
import pytest
from bittensor import http_auth
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from master.db.engine import create_engine
from master.db.models import EdgeNonceRow
from master.edge.authz import AUTH_ERROR_HEADER, NONCE_RETENTION_MARGIN, AuthzService
from master.edge.hotkeys import ChainUnavailable, MetagraphSource, RegisteredHotkeys
from master.edge.model import VERIFIED_HOTKEY_HEADER, VERIFIED_UID_HEADER
from master.edge.nonces import NonceStore
from platform_common.chain import LocalSubnet, Metagraph, dev_keypair, open_chain
from tests.conftest import fresh_database
from tests.support.waiting import eventually

NEURONS = 8
VALIDATORS = 2
RECEIVER = dev_keypair("edge", 0)
SLUG = "demo"
PATH = "/challenges/demo/submit?round=3&lang=en"
BODY = b'{"answer": 42, "note": "\xc3\xa9t\xc3\xa9"}'


class Stub(Protocol):
    """The client side of envoy.service.auth.v3.Authorization, as Envoy calls it."""

    def Check(self, request: Any) -> Awaitable[Any]: ...


# -- Envoy-shaped requests ---------------------------------------------------------


def check_request(
    headers: dict[str, str], *, method: str = "POST", path: str = PATH, body: bytes = BODY
) -> Any:
    """A CheckRequest as Envoy's ext_authz filter sends it (with_request_body, pack_as_bytes)."""
    envoy_headers = {
        ":authority": "edge.example",
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "content-type": "application/json",
        "content-length": str(len(body)),
        "x-request-id": "3b1f0f5e-2c1a-4f2e-9a53-2d5f6f1d2b11",
        "x-forwarded-proto": "https",
    }
    envoy_headers.update({key.lower(): value for key, value in headers.items()})
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.id = "1234567890"
    http.method = method
    http.path = path
    http.host = "edge.example"
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    http.size = len(body)
    http.headers.update(envoy_headers)
    http.raw_body = body
    request.attributes.context_extensions["slug"] = SLUG
    request.attributes.source.address.socket_address.address = "203.0.113.7"
    return request


def signed(
    keypair: Any,
    *,
    method: str = "POST",
    path: str = PATH,
    body: bytes = BODY,
    receiver: str | None = RECEIVER.ss58_address,
    nonce_ns: int | None = None,
) -> dict[str, str]:
    return http_auth.sign(
        keypair, method=method, path=path, body=body, receiver_ss58=receiver, nonce_ns=nonce_ns
    )


def hotkey(index: int) -> Any:
    return dev_keypair("hotkey", index)


def checks(decision: str) -> float:
    value = REGISTRY.get_sample_value("platform_authz_checks_total", {"decision": decision})
    return value or 0.0


def check_seconds_count() -> float:
    return REGISTRY.get_sample_value("platform_authz_seconds_count") or 0.0


def headers_of(options: Any) -> dict[str, str]:
    for option in options:
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return {option.header.key: option.header.value for option in options}


def assert_ok(response: Any, keypair: Any, uid: int) -> None:
    assert response.status.code == code_pb2.OK, response
    assert not response.HasField("denied_response")
    assert headers_of(response.ok_response.headers) == {
        VERIFIED_HOTKEY_HEADER: keypair.ss58_address,
        VERIFIED_UID_HEADER: str(uid),
    }


def assert_refused(response: Any, http_status: int, error: str, reason: str) -> dict[str, Any]:
    """The refusal's shape; returns its JSON body."""
    rpc_code = {
        401: code_pb2.UNAUTHENTICATED,
        403: code_pb2.PERMISSION_DENIED,
        409: code_pb2.PERMISSION_DENIED,
        503: code_pb2.UNAVAILABLE,
    }[http_status]
    assert response.status.code == rpc_code, response
    assert not response.HasField("ok_response")
    denied = response.denied_response
    assert denied.status.code == http_status
    assert headers_of(denied.headers) == {
        "content-type": "application/json",
        AUTH_ERROR_HEADER: reason,
    }
    document: dict[str, Any] = json.loads(denied.body)
    assert set(document) == {"error", "reason", "message"}
    assert (document["error"], document["reason"]) == (error, reason)
    assert document["message"]
    return document


# -- fixtures ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingChain:
    """A chain wrapper counting metagraph reads, optionally failing them."""

    def __init__(self, inner: MetagraphSource) -> None:
        self.inner = inner
        self.reads = 0
        self.fail = False

    async def metagraph(self, block: int | None = None) -> Metagraph:
        self.reads += 1
        if self.fail:
            raise ConnectionError("chain endpoint refused the connection")
        return await self.inner.metagraph(block)


@dataclass
class Edge:
    """Subnet, chain and database shared by the authz services a test starts."""

    subnet: LocalSubnet
    chain: CountingChain
    database_url: str
    stack: contextlib.AsyncExitStack
    engines: list[AsyncEngine] = field(default_factory=list)

    async def engine(self) -> AsyncEngine:
        engine = create_engine(self.database_url)
        self.stack.push_async_callback(engine.dispose)
        self.engines.append(engine)
        return engine

    def nonces(self, engine: AsyncEngine) -> NonceStore:
        """A nonce store on ``engine``, closed (before the engine) at teardown."""
        store = NonceStore(engine)
        self.stack.push_async_callback(store.close)
        return store

    async def serve(
        self,
        *,
        hotkeys: RegisteredHotkeys | None = None,
        nonces: NonceStore | None = None,
        receiver: str | None = RECEIVER.ss58_address,
    ) -> Stub:
        """A new AuthzService (own engine: a separate master) on 127.0.0.1; its stub."""
        if nonces is None:
            nonces = self.nonces(await self.engine())
        if hotkeys is None:
            hotkeys = RegisteredHotkeys(self.chain)
            self.stack.push_async_callback(hotkeys.close)
        service = AuthzService(nonces, hotkeys, receiver_ss58=receiver)
        return await serve(service, self.stack)

    async def rows(self) -> int:
        engine = self.engines[0] if self.engines else await self.engine()
        async with engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(EdgeNonceRow))).scalar_one()
            )


async def serve(service: AuthzService, stack: contextlib.AsyncExitStack) -> Stub:
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stack.push_async_callback(server.stop, None)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stack.push_async_callback(channel.close)
    return cast(Stub, external_auth_pb2_grpc.AuthorizationStub(channel))


@pytest.fixture
def subnet(tmp_path: Path) -> LocalSubnet:
    return LocalSubnet.create(
        tmp_path / "chain.json",
        netuid=1,
        neurons=NEURONS,
        validators=VALIDATORS,
        manual_blocks=True,
    )


async def make_edge(subnet: LocalSubnet, database_url: str) -> AsyncIterator[Edge]:
    await subnet.advance(1)
    chain = open_chain(f"local+file:{subnet.path}", 1)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(chain.close)
        yield Edge(subnet, CountingChain(chain), database_url, stack)


@pytest.fixture
async def edge(subnet: LocalSubnet, database_url: str) -> AsyncIterator[Edge]:
    """On both database backends."""
    async for value in make_edge(subnet, database_url):
        yield value


@pytest.fixture
async def sqlite_edge(
    subnet: LocalSubnet, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Edge]:
    """For behaviour that does not depend on the database backend."""
    url = await fresh_database("sqlite", request, tmp_path)
    async for value in make_edge(subnet, url):
        yield value


# -- accepted requests -------------------------------------------------------------


async def test_a_signed_request_by_a_registered_hotkey_gets_the_verified_identity(
    edge: Edge,
) -> None:
    stub = await edge.serve()
    # A registration on the full subnet hands the newcomer a pruned miner's uid, so
    # the uid reported is the metagraph's and not the hotkey's position anywhere.
    newcomer = dev_keypair("hotkey", 500)
    uid = await edge.subnet.register(
        newcomer.ss58_address, dev_keypair("coldkey", 500).ss58_address
    )
    assert uid == VALIDATORS
    graph = await edge.chain.metagraph()
    assert graph.uid_of(newcomer.ss58_address) == uid
    ok_before, seconds_before = checks("ok"), check_seconds_count()

    assert_ok(await stub.Check(check_request(signed(newcomer))), newcomer, uid)
    assert_ok(await stub.Check(check_request(signed(hotkey(5)))), hotkey(5), 5)
    # Headers only the platform may set are overwritten, never kept.
    spoofed = signed(hotkey(6)) | {
        VERIFIED_HOTKEY_HEADER: hotkey(1).ss58_address,
        VERIFIED_UID_HEADER: "1",
    }
    response = await stub.Check(check_request(spoofed))
    assert_ok(response, hotkey(6), 6)
    # Requests not bound to a receiver are accepted; so is an empty body (a GET).
    unbound = signed(hotkey(7), receiver=None, method="GET", body=b"")
    assert_ok(await stub.Check(check_request(unbound, method="GET", body=b"")), hotkey(7), 7)

    assert checks("ok") == ok_before + 4
    assert check_seconds_count() == seconds_before + 4
    assert await edge.rows() == 4


async def test_the_other_encodings_envoy_may_use_are_verified_too(sqlite_edge: Edge) -> None:
    stub = await sqlite_edge.serve()
    # Without pack_as_bytes the body arrives as a string.
    request = check_request(signed(hotkey(4)))
    http = request.attributes.request.http
    http.ClearField("raw_body")
    http.body = BODY.decode()
    assert_ok(await stub.Check(request), hotkey(4), 4)
    # With encode_raw_headers the headers arrive in header_map, as bytes.
    request = check_request(signed(hotkey(4)))
    http = request.attributes.request.http
    for key, value in sorted(http.headers.items()):
        http.header_map.headers.add(key=key, raw_value=value.encode())
    http.ClearField("headers")
    assert_ok(await stub.Check(request), hotkey(4), 4)


# -- refusals ----------------------------------------------------------------------


def _other_key(headers: dict[str, str]) -> dict[str, str]:
    # Signed by hotkey 3 but claiming to be hotkey 4.
    return headers | {http_auth.HEADER_HOTKEY: hotkey(4).ss58_address}


async def test_tampered_or_unsigned_requests_are_401_and_burn_no_nonce(edge: Edge) -> None:
    stub = await edge.serve()
    now = time.time_ns()
    genuine = signed(hotkey(4), nonce_ns=now)
    signature = genuine[http_auth.HEADER_SIGNATURE]
    cases: list[tuple[str, Any, str]] = [
        ("body", check_request(genuine, body=BODY + b" "), "bad_signature"),
        ("path", check_request(genuine, path=PATH.replace("round=3", "round=4")), "bad_signature"),
        ("method", check_request(genuine, method="PUT"), "bad_signature"),
        ("key", check_request(_other_key(signed(hotkey(3), nonce_ns=now))), "bad_signature"),
        ("unsigned", check_request({}), "missing_signature"),
        (
            "no signature",
            check_request({k: v for k, v in genuine.items() if k != http_auth.HEADER_SIGNATURE}),
            "missing_signature",
        ),
        (
            "nonce",
            check_request(genuine | {http_auth.HEADER_NONCE: "soon"}),
            "malformed",
        ),
        (
            "old",
            check_request(signed(hotkey(4), nonce_ns=now - 60 * 10**9)),
            "stale",
        ),
        (
            "future",
            check_request(signed(hotkey(4), nonce_ns=now + 60 * 10**9)),
            "stale",
        ),
        (
            "receiver",
            check_request(signed(hotkey(4), receiver=hotkey(0).ss58_address, nonce_ns=now)),
            "wrong_receiver",
        ),
    ]
    before = {reason: checks(reason) for _, _, reason in cases}
    for name, request, reason in cases:
        response = await stub.Check(request)
        document = assert_refused(response, 401, "unauthenticated", reason)
        assert signature not in response.denied_response.body, name
        assert signature.removeprefix("0x") not in document["message"], name
    for reason, count in before.items():
        expected = sum(1 for _, _, r in cases if r == reason)
        assert checks(reason) == count + expected, reason
    assert await edge.rows() == 0

    # None of the refusals poisoned the genuine request's nonce; a replay of it is 409.
    assert_ok(await stub.Check(check_request(genuine)), hotkey(4), 4)
    replayed_before = checks("replayed")
    assert_refused(await stub.Check(check_request(genuine)), 409, "replayed", "replayed")
    assert checks("replayed") == replayed_before + 1
    assert await edge.rows() == 1


async def test_a_replay_is_refused_by_another_master_on_the_same_database(edge: Edge) -> None:
    first, second = await edge.serve(), await edge.serve()
    headers = signed(hotkey(5))
    assert_ok(await first.Check(check_request(headers)), hotkey(5), 5)
    assert_refused(await second.Check(check_request(headers)), 409, "replayed", "replayed")
    assert_refused(await first.Check(check_request(headers)), 409, "replayed", "replayed")
    # The claim outlives the freshness window (plus a margin for replicas' clocks), so
    # pruning never lets a copy through while it could still pass the freshness check.
    nonce_time = datetime.fromtimestamp(int(headers[http_auth.HEADER_NONCE]) / 1e9, UTC)
    async with edge.engines[0].connect() as conn:
        stored = (await conn.execute(select(EdgeNonceRow.expire_time))).scalar_one()
    stored = stored if stored.tzinfo else stored.replace(tzinfo=UTC)
    window = http_auth.DEFAULT_MAX_AGE + http_auth.DEFAULT_ALLOWED_SKEW
    assert stored - nonce_time == timedelta(seconds=window + NONCE_RETENTION_MARGIN)
    assert await edge.nonces(edge.engines[1]).prune(nonce_time + timedelta(seconds=window)) == 0
    assert_refused(await second.Check(check_request(headers)), 409, "replayed", "replayed")
    # The other way round, and concurrently: exactly one of the copies is let through.
    racing = signed(hotkey(6))
    responses = await asyncio.gather(
        *(stub.Check(check_request(racing)) for stub in (first, second) * 4)
    )
    codes = sorted(r.status.code for r in responses)
    assert codes == [code_pb2.OK] + [code_pb2.PERMISSION_DENIED] * 7


async def test_claims_race_on_the_primary_key(edge: Edge) -> None:
    stores = [edge.nonces(await edge.engine()) for _ in range(2)]
    expire = datetime.now(UTC) + timedelta(seconds=60)
    results = await asyncio.gather(*(store.claim("5Hotkey", 77, expire) for store in stores * 5))
    assert sorted(results) == [False] * 9 + [True]
    # Another hotkey, or another nonce, is a different claim.
    assert await stores[1].claim("5Other", 77, expire)
    assert await stores[0].claim("5Hotkey", 78, expire)


async def test_a_store_that_breaks_after_connecting_recovers_and_keeps_its_claims(
    edge: Edge,
) -> None:
    engine = await edge.engine()
    store = edge.nonces(engine)
    expire = datetime.now(UTC) + timedelta(seconds=60)
    assert await store.claim("5Hotkey", 1, expire)

    async def rename(old: str, new: str) -> None:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    await rename("edge_nonces", "edge_nonces_away")
    # A database error on the claim's own connection, on either backend's path.
    with pytest.raises(SQLAlchemyError):
        await store.claim("5Hotkey", 2, expire)
    await rename("edge_nonces_away", "edge_nonces")
    # A new connection: the earlier claim is still there, new ones go through.
    assert not await store.claim("5Hotkey", 1, expire)
    assert await store.claim("5Hotkey", 2, expire)
    assert await edge.rows() == 2


async def test_an_unregistered_hotkey_is_forbidden_without_burning_a_nonce(
    sqlite_edge: Edge,
) -> None:
    stub = await sqlite_edge.serve()
    stranger = dev_keypair("hotkey", 900)
    before = checks("not_registered")
    response = await stub.Check(check_request(signed(stranger)))
    document = assert_refused(response, 403, "forbidden", "not_registered")
    assert document["message"] == "the signing hotkey is not registered on the subnet"
    assert checks("not_registered") == before + 1
    assert await sqlite_edge.rows() == 0


async def test_a_hotkey_registered_after_startup_is_accepted_after_a_refresh(
    sqlite_edge: Edge,
) -> None:
    clock = FakeClock()
    hotkeys = RegisteredHotkeys(
        sqlite_edge.chain, refresh_interval=12.0, miss_refresh_interval=2.0, clock=clock
    )
    stub = await sqlite_edge.serve(hotkeys=hotkeys)
    newcomer = dev_keypair("hotkey", 600)

    assert_ok(await stub.Check(check_request(signed(hotkey(3)))), hotkey(3), 3)
    assert sqlite_edge.chain.reads == 1
    assert_refused(
        await stub.Check(check_request(signed(newcomer))), 403, "forbidden", "not_registered"
    )
    assert sqlite_edge.chain.reads == 1  # the metagraph was read just now: no re-read

    await sqlite_edge.subnet.advance(1)
    uid = await sqlite_edge.subnet.register(
        newcomer.ss58_address, dev_keypair("coldkey", 600).ss58_address
    )
    # Misses inside miss_refresh_interval do not reach the chain.
    for _ in range(3):
        assert_refused(
            await stub.Check(check_request(signed(newcomer))), 403, "forbidden", "not_registered"
        )
    assert sqlite_edge.chain.reads == 1

    clock.now += 2.0
    assert_ok(await stub.Check(check_request(signed(newcomer))), newcomer, uid)
    assert sqlite_edge.chain.reads == 2
    # The miner that lost its uid to the newcomer is refused from then on.
    assert_refused(
        await stub.Check(check_request(signed(hotkey(uid)))), 403, "forbidden", "not_registered"
    )


async def test_a_request_for_another_receiver_is_refused_when_the_edge_has_none(
    sqlite_edge: Edge,
) -> None:
    stub = await sqlite_edge.serve(receiver=None)
    assert_refused(
        await stub.Check(check_request(signed(hotkey(3)))), 401, "unauthenticated", "wrong_receiver"
    )
    assert_ok(await stub.Check(check_request(signed(hotkey(3), receiver=None))), hotkey(3), 3)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_chain_is_503_until_it_can_be_read(
    sqlite_edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = open_chain(f"local+http://127.0.0.1:{_closed_port()}", 1)
    sqlite_edge.stack.push_async_callback(unreachable.close)
    clock = FakeClock()
    source = CountingChain(unreachable)
    hotkeys = RegisteredHotkeys(source, miss_refresh_interval=2.0, clock=clock)
    stub = await sqlite_edge.serve(hotkeys=hotkeys)
    before = checks("chain_unavailable")
    caplog.set_level(logging.WARNING, logger="master.edge.hotkeys")

    for _ in range(3):
        assert_refused(
            await stub.Check(check_request(signed(hotkey(3)))),
            503,
            "unavailable",
            "chain_unavailable",
        )
    assert checks("chain_unavailable") == before + 3
    assert source.reads == 1  # one attempt per miss_refresh_interval
    assert [r.message for r in caplog.records if r.name == "master.edge.hotkeys"] == [
        "metagraph refresh failed"
    ]
    assert await sqlite_edge.rows() == 0

    # Once the chain answers, the same kind of request goes through.
    source.inner = sqlite_edge.chain
    clock.now += 2.0
    assert_ok(await stub.Check(check_request(signed(hotkey(3)))), hotkey(3), 3)


async def test_an_unusable_nonce_store_is_503(sqlite_edge: Edge, tmp_path: Path) -> None:
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'db.sqlite'}")
    sqlite_edge.stack.push_async_callback(broken.dispose)
    stub = await sqlite_edge.serve(nonces=sqlite_edge.nonces(broken))
    before = checks("nonce_store_unavailable")
    assert_refused(
        await stub.Check(check_request(signed(hotkey(3)))),
        503,
        "unavailable",
        "nonce_store_unavailable",
    )
    assert checks("nonce_store_unavailable") == before + 1


# -- the registered-hotkey cache -----------------------------------------------------


async def test_the_hotkey_cache_shares_refreshes_and_keeps_the_last_good_metagraph(
    sqlite_edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    chain = sqlite_edge.chain
    clock = FakeClock()
    hotkeys = RegisteredHotkeys(
        chain, refresh_interval=12.0, miss_refresh_interval=2.0, clock=clock
    )
    sqlite_edge.stack.push_async_callback(hotkeys.close)
    caplog.set_level(logging.WARNING, logger="master.edge.hotkeys")

    # Concurrent first lookups share one read.
    uids = await asyncio.gather(*(hotkeys.lookup(hotkey(i).ss58_address) for i in range(NEURONS)))
    assert uids == list(range(NEURONS))
    assert chain.reads == 1

    # Hits inside refresh_interval never read; an old metagraph is refreshed in the
    # background while hits still answer at once.
    clock.now += 11.0
    assert await hotkeys.lookup(hotkey(2).ss58_address) == 2
    assert chain.reads == 1
    clock.now += 1.0
    chain.fail = True
    assert await hotkeys.lookup(hotkey(2).ss58_address) == 2
    assert await hotkeys.refresh()  # waits for the refresh in flight, which failed
    assert chain.reads == 2
    warnings = [r.message for r in caplog.records if r.name == "master.edge.hotkeys"]
    assert warnings == ["metagraph refresh failed"]
    # The last good metagraph is still in use, and a failed refresh is not retried
    # on every request.
    assert await hotkeys.lookup(hotkey(3).ss58_address) == 3
    assert chain.reads == 2

    # Concurrent misses after miss_refresh_interval share one read too.
    chain.fail = False
    clock.now += 2.0
    stranger = dev_keypair("hotkey", 700).ss58_address
    assert await asyncio.gather(*(hotkeys.lookup(stranger) for _ in range(5))) == [None] * 5
    assert chain.reads == 3


async def test_the_hotkey_cache_raises_when_no_metagraph_was_ever_read() -> None:
    class Down:
        async def metagraph(self, block: int | None = None) -> Metagraph:
            raise OSError("unreachable")

    hotkeys = RegisteredHotkeys(Down())
    with pytest.raises(ChainUnavailable):
        await hotkeys.lookup(hotkey(1).ss58_address)
    assert not await hotkeys.refresh()
    assert hotkeys.metagraph is None


# -- pruning -----------------------------------------------------------------------


async def test_prune_removes_only_expired_nonces(edge: Edge) -> None:
    store = edge.nonces(await edge.engine())
    now = datetime.now(UTC)
    assert await store.claim("5Expired", 1, now - timedelta(seconds=5))
    assert await store.claim("5AtNow", 2, now)
    assert await store.claim("5Live", 3, now + timedelta(seconds=5))
    assert await store.prune(now) == 2
    assert await edge.rows() == 1
    # The pruned nonces could be claimed again (they would be stale by then); the live
    # one is still refused.
    assert not await store.claim("5Live", 3, now + timedelta(seconds=5))
    assert await store.claim("5Expired", 1, now - timedelta(seconds=5))
    assert await store.prune(now) == 1
    assert await store.prune(now) == 0


async def test_prune_forever_keeps_pruning_until_cancelled(sqlite_edge: Edge) -> None:
    store = sqlite_edge.nonces(await sqlite_edge.engine())
    past = datetime.now(UTC) - timedelta(seconds=1)
    await store.claim("5Expired", 1, past)
    await store.claim("5Live", 2, datetime.now(UTC) + timedelta(hours=1))
    task = asyncio.create_task(store.prune_forever(0.01))
    try:
        await eventually(lambda: _equals(sqlite_edge.rows(), 1), "one nonce row", 5, poll=0.01)
        await store.claim("5Expired", 1, past)  # a second round is pruned as well
        await eventually(lambda: _equals(sqlite_edge.rows(), 1), "one nonce row", 5, poll=0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not await store.claim("5Live", 2, datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(ValueError, match="interval"):
        await store.prune_forever(0)


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
