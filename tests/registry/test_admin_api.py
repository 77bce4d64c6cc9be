"""The Registry's admin and public RPCs over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from master.db.engine import create_engine
from master.registry.rules import Policy
from master.registry.store import RegistryStore
from master.registry.tokens import TokenIssuer
from platform_common.protos import scalar_to_proto
from platform_network.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.helpers import ACTIVE, DISABLED, DRAFT, INACTIVE, create, refused, set_status, spec
from tests.support.master import ADMIN, RunningMaster

if TYPE_CHECKING:
    Stub = registry_pb2_grpc.RegistryAsyncStub
else:  # the async stub class exists only in the type stubs
    Stub = registry_pb2_grpc.RegistryStub
Metadata = tuple[tuple[str, str], ...]
Code = grpc.StatusCode

WRONG_TOKEN: Metadata = (("authorization", "Bearer wrong-admin-token-0123456789abcdef"),)
BASIC: Metadata = (("authorization", "Basic x"),)


# ---------------------------------------------------------------------------
# Local helpers


async def get(stub: Stub, slug: str) -> registry_pb2.Challenge:
    return await stub.GetChallenge(registry_pb2.GetChallengeRequest(slug=slug), metadata=ADMIN)


async def listing(stub: Stub, **fields: Any) -> registry_pb2.ListChallengesResponse:
    return await stub.ListChallenges(registry_pb2.ListChallengesRequest(**fields), metadata=ADMIN)


async def head(stub: Stub) -> int:
    return (await listing(stub, page_size=1)).revision


def update(
    stub: Stub, target: str, paths: Sequence[str], expected_revision: int = 0, /, **fields: Any
) -> Awaitable[registry_pb2.Challenge]:
    """UpdateChallenge of ``target``; ``fields`` (slug included) fill the ChallengeSpec."""
    return stub.UpdateChallenge(
        registry_pb2.UpdateChallengeRequest(
            slug=target,
            challenge=registry_pb2.ChallengeSpec(**fields),
            update_mask=FieldMask(paths=list(paths)),
            expected_revision=expected_revision,
        ),
        metadata=ADMIN,
    )


async def stored(stub: Stub) -> tuple[bytes, ...]:
    """Everything an admin can read: the full listing (with its revision) and every Get."""
    full = await listing(stub, page_size=1000)
    gets = [await get(stub, c.slug) for c in full.challenges]
    return tuple(m.SerializeToString(deterministic=True) for m in [full, *gets])


async def public(
    stub: Stub, revision: int, within: float = 5.0
) -> registry_pb2.ListPublicChallengesResponse:
    """The public catalogue once it has caught up with ``revision`` (no credentials sent)."""
    deadline = time.monotonic() + within
    while True:
        response = await stub.ListPublicChallenges(registry_pb2.ListPublicChallengesRequest())
        if response.revision >= revision:
            return response
        assert time.monotonic() < deadline, f"public catalogue stuck at {response.revision}"
        await asyncio.sleep(0.05)


DetailT = TypeVar("DetailT", error_details_pb2.BadRequest, error_details_pb2.PreconditionFailure)


def details_of(error: grpc.aio.AioRpcError, kind: type[DetailT]) -> list[DetailT]:
    """The google.rpc details of type ``kind`` carried by ``error``."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            info = kind()
            detail.Unpack(info)
            found.append(info)
    return found


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Fields named by the google.rpc.BadRequest details of ``error``."""
    return [
        v.field
        for info in details_of(error, error_details_pb2.BadRequest)
        for v in info.field_violations
    ]


def precondition_types(error: grpc.aio.AioRpcError) -> list[str]:
    return [
        v.type
        for info in details_of(error, error_details_pb2.PreconditionFailure)
        for v in info.violations
    ]


async def invalid(call: Awaitable[Any], field: str) -> grpc.aio.AioRpcError:
    """``call`` must fail INVALID_ARGUMENT naming ``field`` in its message and its details."""
    error = await refused(call, Code.INVALID_ARGUMENT)
    assert field in bad_request_fields(error), (field, bad_request_fields(error))
    assert (error.details() or "").startswith(f"{field}: "), error.details()
    return error


async def token_matches(database_url: str, slug: str, token: str) -> bool:
    engine = create_engine(database_url)
    try:
        return await RegistryStore(engine, Policy(), TokenIssuer(bytes(32))).token_matches(
            slug, token
        )
    finally:
        await engine.dispose()


scalar = scalar_to_proto


def full_spec(slug: str, share: float = 0.2) -> registry_pb2.ChallengeSpec:
    return spec(
        slug,
        share,
        description="Solve things.\nWell.",
        routes=registry_pb2.PublicRoutes(
            public_port=8080,
            blocked_path_prefixes=["/admin"],
            signed_path_prefixes=["/submit"],
            rate_limit_per_hotkey_per_minute=60,
            request_timeout_seconds=30,
        ),
        resources=common_pb2.Resources(cpu="500m", memory="512Mi", gpu=1, storage="10Gi"),
        env={"LOG_LEVEL": "debug-level-sentinel", "MODE": "fast"},
        metadata={"homepage": scalar("https://example.org"), "version": scalar(3)},
    )


# ---------------------------------------------------------------------------
# CreateChallenge


async def test_create_returns_the_token_once_and_starts_draft(master: RunningMaster) -> None:
    stub = master.registry
    assert await head(stub) == 0
    created = await stub.CreateChallenge(
        registry_pb2.CreateChallengeRequest(challenge=full_spec("alpha")), metadata=ADMIN
    )
    token = created.token
    assert token.startswith("pct_")
    assert len(token) > 40
    c = created.challenge
    assert c.status == DRAFT
    assert (c.revision, c.create_revision) == (1, 1)
    assert c.create_time == c.update_time == c.token_issue_time == c.status_time
    assert c.status_reason == ""
    assert c.create_time.seconds > 0
    sent = full_spec("alpha")
    for name in ("slug", "name", "description", "image", "emission_share"):
        assert getattr(c, name) == getattr(sent, name), name
    assert c.routes == sent.routes
    assert c.resources == sent.resources
    assert dict(c.env) == dict(sent.env)
    assert dict(c.metadata) == dict(sent.metadata)

    got = await get(stub, "alpha")
    assert got == c
    everything = await stored(stub)
    assert not any(token.encode() in blob for blob in everything)
    assert await head(stub) == 1


async def test_each_create_issues_a_different_token(master: RunningMaster) -> None:
    first = await create(master.registry, "alpha")
    second = await create(master.registry, "beta")
    assert first.token != second.token


async def test_create_stores_the_share_at_ppb_resolution(master: RunningMaster) -> None:
    created = await create(master.registry, "alpha", 0.1234567896)
    assert created.challenge.emission_share == 0.12345679
    assert (await get(master.registry, "alpha")).emission_share == 0.12345679


CREATE_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"slug": "Bad_Slug"}, "challenge.slug"),
    ({"slug": ""}, "challenge.slug"),
    ({"name": ""}, "challenge.name"),
    ({"image": "not an image"}, "challenge.image"),
    ({"emission_share": 1.5}, "challenge.emission_share"),
    ({"emission_share": float("nan")}, "challenge.emission_share"),
    (
        {"routes": registry_pb2.PublicRoutes(public_port=70000)},
        "challenge.routes.public_port",
    ),
    (
        {"routes": registry_pb2.PublicRoutes(blocked_path_prefixes=["/ok", "/a/../b"])},
        "challenge.routes.blocked_path_prefixes[1]",
    ),
    ({"resources": common_pb2.Resources(cpu="lots")}, "challenge.resources.cpu"),
    ({"env": {"PLATFORM_ROLE": "x"}}, "challenge.env['PLATFORM_ROLE']"),
    ({"env": {"DB_PASSWORD": "x"}}, "challenge.env['DB_PASSWORD']"),
    ({"metadata": {"twitter": scalar("@x")}}, "challenge.metadata['twitter']"),
]


async def test_create_refuses_a_bad_field(master: RunningMaster) -> None:
    stub = master.registry
    base = MessageToDict(spec("alpha"), preserving_proto_field_name=True)
    for fields, field in CREATE_REFUSALS:
        challenge = registry_pb2.ChallengeSpec(**{**base, **fields})
        request = registry_pb2.CreateChallengeRequest(challenge=challenge)
        await invalid(stub.CreateChallenge(request, metadata=ADMIN), field)
    assert await head(stub) == 0
    assert (await listing(stub)).challenges == []


async def test_create_requires_a_challenge(master: RunningMaster) -> None:
    await invalid(
        master.registry.CreateChallenge(registry_pb2.CreateChallengeRequest(), metadata=ADMIN),
        "challenge",
    )


async def test_create_reports_every_bad_field(master: RunningMaster) -> None:
    request = registry_pb2.CreateChallengeRequest(
        challenge=spec("Bad", 2.0, image="", env={"API_KEY": "x"})
    )
    error = await refused(
        master.registry.CreateChallenge(request, metadata=ADMIN), Code.INVALID_ARGUMENT
    )
    assert bad_request_fields(error) == [
        "challenge.slug",
        "challenge.image",
        "challenge.emission_share",
        "challenge.env['API_KEY']",
    ]


async def test_duplicate_slug_is_already_exists(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.2)
    before = await stored(stub)
    error = await refused(create(stub, "alpha", 0.5, name="Other"), Code.ALREADY_EXISTS)
    assert "'alpha' already exists" in (error.details() or "")
    assert await stored(stub) == before


async def test_revision_advances_by_exactly_one_per_accepted_write(master: RunningMaster) -> None:
    stub = master.registry
    a = (await create(stub, "alpha", 0.3)).challenge
    b = (await create(stub, "beta", 0.3)).challenge
    assert (a.revision, b.revision) == (1, 2)
    updated = await update(stub, "alpha", ["name"], name="Alpha Two")
    assert (updated.revision, updated.create_revision) == (3, 1)
    activated = await set_status(stub, "alpha", ACTIVE)
    assert activated.revision == 4
    rotated = await stub.RotateChallengeToken(
        registry_pb2.RotateChallengeTokenRequest(slug="alpha"), metadata=ADMIN
    )
    assert rotated.challenge.revision == 5
    assert (await set_status(stub, "alpha", INACTIVE)).revision == 6
    deleted = await stub.DeleteChallenge(
        registry_pb2.DeleteChallengeRequest(slug="alpha"), metadata=ADMIN
    )
    assert deleted.revision == 7
    assert await head(stub) == 7
    assert (await get(stub, "beta")).revision == 2  # untouched by the others' writes


# ---------------------------------------------------------------------------
# GetChallenge


async def test_get_unknown_slug_is_not_found(master: RunningMaster) -> None:
    error = await refused(get(master.registry, "missing"), Code.NOT_FOUND)
    assert "'missing'" in (error.details() or "")


async def test_get_malformed_slug_is_invalid(master: RunningMaster) -> None:
    for slug in ["", "Bad_Slug", "1abc", "a" * 41, "trailing-"]:
        await invalid(get(master.registry, slug), "slug")


# ---------------------------------------------------------------------------
# ListChallenges


async def test_list_pages_through_challenges_in_slug_order(master: RunningMaster) -> None:
    stub = master.registry
    for slug in ["echo", "alpha", "delta", "charlie", "bravo"]:
        await create(stub, slug, 0.1)
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await listing(stub, page_size=2, page_token=token)
        assert page.revision == 5
        pages.append([c.slug for c in page.challenges])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["alpha", "bravo"], ["charlie", "delta"], ["echo"]]
    everything = await listing(stub)  # page_size 0 means 100
    assert [c.slug for c in everything.challenges] == ["alpha", "bravo", "charlie", "delta", "echo"]
    assert everything.next_page_token == ""
    assert everything.challenges[0] == await get(stub, "alpha")
    exact = await listing(stub, page_size=5)
    assert len(exact.challenges) == 5
    assert exact.next_page_token == ""


async def test_list_filters_by_status(master: RunningMaster) -> None:
    stub = master.registry
    for slug in ["alpha", "bravo", "charlie", "delta"]:
        await create(stub, slug, 0.1)
    await set_status(stub, "alpha", ACTIVE)
    await set_status(stub, "charlie", ACTIVE)
    await set_status(stub, "delta", DISABLED)

    async def slugs(*statuses: registry_pb2.ChallengeStatus.ValueType, size: int = 0) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            page = await listing(stub, statuses=list(statuses), page_size=size, page_token=token)
            out += [c.slug for c in page.challenges]
            token = page.next_page_token
            if not token:
                return out

    assert await slugs(ACTIVE) == ["alpha", "charlie"]
    assert await slugs(ACTIVE, size=1) == ["alpha", "charlie"]
    assert await slugs(DRAFT) == ["bravo"]
    assert await slugs(ACTIVE, DISABLED) == ["alpha", "charlie", "delta"]
    assert await slugs(INACTIVE) == []
    assert await slugs() == ["alpha", "bravo", "charlie", "delta"]


async def test_list_refuses_bad_arguments(master: RunningMaster) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"page_token": "garbage"}, "page_token"),
        ({"page_token": "djI6YWxwaGE"}, "page_token"),  # "v2:alpha"
        ({"statuses": [0]}, "statuses[0]"),
        ({"statuses": [ACTIVE, 9]}, "statuses[1]"),
    ]
    for fields, field in cases:
        await invalid(listing(master.registry, **fields), field)


async def test_list_accepts_page_sizes_in_range(master: RunningMaster) -> None:
    await create(master.registry, "alpha")
    for size in [0, 1, 1000]:  # 0 means the default, 100
        page = await listing(master.registry, page_size=size)
        assert [c.slug for c in page.challenges] == ["alpha"], size


async def test_list_refuses_a_non_ascii_page_token(master: RunningMaster) -> None:
    await invalid(listing(master.registry, page_token="é"), "page_token")


async def test_list_answers_a_crafted_page_token_precisely(
    master: RunningMaster,
) -> None:
    await create(master.registry, "alpha")
    crafted = base64.urlsafe_b64encode(b"v1:\x00").decode().rstrip("=")
    outcome: registry_pb2.ListChallengesResponse | grpc.aio.AioRpcError
    try:
        outcome = await listing(master.registry, page_token=crafted)
    except grpc.aio.AioRpcError as error:
        outcome = error
    if isinstance(outcome, grpc.aio.AioRpcError):  # refusing it is fine, if done precisely
        assert outcome.code() == Code.INVALID_ARGUMENT, outcome.details()
        assert bad_request_fields(outcome) == ["page_token"]
    else:
        assert [c.slug for c in outcome.challenges] == ["alpha"]


# ---------------------------------------------------------------------------
# UpdateChallenge


def _rename(c: registry_pb2.Challenge) -> None:
    c.name = "Renamed"


def _port(c: registry_pb2.Challenge) -> None:
    c.routes.public_port = 9090


def _cpu(c: registry_pb2.Challenge) -> None:
    c.resources.cpu = "2"


def _rename_and_cpu(c: registry_pb2.Challenge) -> None:
    _rename(c)
    _cpu(c)


def _env(c: registry_pb2.Challenge) -> None:
    c.env.clear()
    c.env["NEW_ONLY"] = "1"


def _metadata(c: registry_pb2.Challenge) -> None:
    c.metadata.clear()
    c.metadata["category"].CopyFrom(scalar("vision"))


def _routes(c: registry_pb2.Challenge) -> None:
    c.routes.CopyFrom(registry_pb2.PublicRoutes(public_port=9090))


PATCH: dict[str, Any] = {
    "slug": "ignored",
    "name": "Renamed",
    "description": "patched",
    "image": "ghcr.io/platform-test/patched:9",
    "emission_share": 0.9,
    # Every other route/resource field is zero here: only masked fields may be taken.
    "routes": registry_pb2.PublicRoutes(public_port=9090),
    "resources": common_pb2.Resources(cpu="2"),
    "env": {"NEW_ONLY": "1"},
    "metadata": {"category": scalar("vision")},
}


MASKED_UPDATES: list[tuple[list[str], Callable[[registry_pb2.Challenge], None]]] = [
    (["name"], _rename),
    (["routes.public_port"], _port),
    (["resources.cpu"], _cpu),
    (["env"], _env),
    (["metadata"], _metadata),
    (["routes"], _routes),
    (["name", "resources.cpu", "name"], _rename_and_cpu),
]


async def test_update_changes_only_the_masked_fields(master: RunningMaster) -> None:
    stub = master.registry
    for i, (paths, change) in enumerate(MASKED_UPDATES):
        slug = f"case-{i}"
        before = (
            await stub.CreateChallenge(
                registry_pb2.CreateChallengeRequest(challenge=full_spec(slug)), metadata=ADMIN
            )
        ).challenge
        after = await update(stub, slug, paths, **PATCH)
        expected = registry_pb2.Challenge()
        expected.CopyFrom(before)
        change(expected)
        expected.revision = before.revision + 1
        expected.update_time.CopyFrom(after.update_time)
        assert after == expected, paths
        assert after.update_time.ToDatetime() >= before.update_time.ToDatetime()
        assert await get(stub, slug) == after, paths


async def test_update_with_matching_expected_revision(master: RunningMaster) -> None:
    stub = master.registry
    created = (await create(stub, "alpha")).challenge
    after = await update(stub, "alpha", ["description"], created.revision, description="new")
    assert after.description == "new"
    assert after.revision == created.revision + 1


async def test_update_with_stale_expected_revision_is_aborted(master: RunningMaster) -> None:
    stub = master.registry
    created = (await create(stub, "alpha")).challenge
    await update(stub, "alpha", ["description"], description="first")
    before = await stored(stub)
    error = await refused(
        update(stub, "alpha", ["description"], created.revision, description="second"),
        Code.ABORTED,
    )
    assert (error.details() or "").startswith("expected_revision: ")
    assert await stored(stub) == before


UPDATE_REFUSALS: list[tuple[list[str], dict[str, Any], str]] = [
    ([], {"name": "x"}, "update_mask"),
    (["slug"], {"slug": "beta"}, "update_mask.paths[0]"),
    (["name", "status"], {"name": "x"}, "update_mask.paths[1]"),
    (["token"], {}, "update_mask.paths[0]"),
    (["revision"], {}, "update_mask.paths[0]"),
    (["bogus"], {}, "update_mask.paths[0]"),
    (["routes.bogus"], {}, "update_mask.paths[0]"),
    (["env.LOG_LEVEL"], {}, "update_mask.paths[0]"),
    (["name"], {"name": ""}, "challenge.name"),
    (["image"], {"image": "ghcr.io/UPPER/case"}, "challenge.image"),
    (["emission_share"], {"emission_share": 1.01}, "challenge.emission_share"),
    (
        ["routes.public_port"],
        {"routes": registry_pb2.PublicRoutes(public_port=65536)},
        "challenge.routes.public_port",
    ),
    (
        ["routes.signed_path_prefixes"],
        {"routes": registry_pb2.PublicRoutes(signed_path_prefixes=["/a", "/A"])},
        "challenge.routes.signed_path_prefixes[1]",
    ),
    (
        ["resources.memory"],
        {"resources": common_pb2.Resources(memory="512m")},
        "challenge.resources.memory",
    ),
    (["env"], {"env": {"GITHUB_TOKEN": "x"}}, "challenge.env['GITHUB_TOKEN']"),
    (
        ["metadata"],
        {"metadata": {"homepage": scalar("x" * 513)}},
        "challenge.metadata['homepage']",
    ),
]


async def test_update_refusals_name_the_field_and_change_nothing(master: RunningMaster) -> None:
    stub = master.registry
    await stub.CreateChallenge(
        registry_pb2.CreateChallengeRequest(challenge=full_spec("alpha")), metadata=ADMIN
    )
    before = await stored(stub)
    for paths, fields, field in UPDATE_REFUSALS:
        await invalid(update(stub, "alpha", paths, **fields), field)
        assert await stored(stub) == before, (paths, fields)


async def test_update_unknown_or_malformed_slug(master: RunningMaster) -> None:
    stub = master.registry
    error = await refused(update(stub, "missing", ["name"], name="x"), Code.NOT_FOUND)
    assert "'missing'" in (error.details() or "")
    await invalid(update(stub, "Bad_Slug", ["name"], name="x"), "slug")


async def test_update_share_of_an_active_challenge_keeps_the_sum_at_most_one(
    master: RunningMaster,
) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.6)
    await create(stub, "beta", 0.3)
    await create(stub, "gamma", 0.1)
    await set_status(stub, "alpha", ACTIVE)
    await set_status(stub, "beta", ACTIVE)
    before = await stored(stub)

    error = await refused(
        update(stub, "beta", ["emission_share"], emission_share=0.5), Code.FAILED_PRECONDITION
    )
    assert "current sum 0.6" in (error.details() or "")
    assert precondition_types(error) == ["EMISSION_SUM"]
    assert await stored(stub) == before

    # Exactly 1 is allowed; lowering is allowed; non-ACTIVE challenges are not counted.
    assert (
        await update(stub, "beta", ["emission_share"], emission_share=0.4)
    ).emission_share == 0.4
    assert (
        await update(stub, "alpha", ["emission_share"], emission_share=0.1)
    ).emission_share == 0.1
    assert (
        await update(stub, "gamma", ["emission_share"], emission_share=1.0)
    ).emission_share == 1.0


# ---------------------------------------------------------------------------
# SetChallengeStatus


async def test_every_legal_transition_is_accepted(master: RunningMaster) -> None:
    stub = master.registry
    revision = (await create(stub, "alpha", 0.5)).challenge.revision
    for target in [ACTIVE, INACTIVE, ACTIVE, DISABLED, INACTIVE, DISABLED, INACTIVE]:
        changed = await set_status(stub, "alpha", target, reason="test")
        revision += 1
        assert (changed.status, changed.revision) == (target, revision)
        assert await get(stub, "alpha") == changed
    await create(stub, "beta")
    assert (await set_status(stub, "beta", DISABLED)).status == DISABLED
    await create(stub, "gamma")
    assert (await set_status(stub, "gamma", ACTIVE)).status == ACTIVE


async def test_illegal_transitions_are_refused_and_change_nothing(master: RunningMaster) -> None:
    stub = master.registry
    illegal = {
        "draft": (DRAFT, [INACTIVE]),
        "active": (ACTIVE, [DRAFT]),
        "inactive": (INACTIVE, [DRAFT]),
        "disabled": (DISABLED, [ACTIVE, DRAFT]),
    }
    path = {DRAFT: [], ACTIVE: [ACTIVE], INACTIVE: [ACTIVE, INACTIVE], DISABLED: [DISABLED]}
    for slug, (status, _) in illegal.items():
        await create(stub, slug, 0.1)
        for step in path[status]:
            await set_status(stub, slug, step)
    before = await stored(stub)
    names = registry_pb2.ChallengeStatus.Name
    for slug, (status, targets) in illegal.items():
        for target in targets:
            error = await refused(set_status(stub, slug, target), Code.FAILED_PRECONDITION)
            message = error.details() or ""
            current_name = names(status).removeprefix("CHALLENGE_STATUS_")
            target_name = names(target).removeprefix("CHALLENGE_STATUS_")
            assert f"from {current_name} to {target_name}" in message, message
            assert precondition_types(error) == ["STATUS_TRANSITION"]
    assert await stored(stub) == before


async def test_setting_the_current_status_again_is_a_no_op(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.5)
    draft = await get(stub, "alpha")
    assert await set_status(stub, "alpha", DRAFT) == draft
    active = await set_status(stub, "alpha", ACTIVE)
    before = await stored(stub)
    assert await set_status(stub, "alpha", ACTIVE) == active
    assert await set_status(stub, "alpha", ACTIVE, expected_revision=active.revision) == active
    assert await stored(stub) == before


async def test_status_changes_record_their_reason_and_time(master: RunningMaster) -> None:
    stub = master.registry
    created = (await create(stub, "alpha", 0.5)).challenge
    active = await set_status(stub, "alpha", ACTIVE, reason="launch")
    assert active.status_reason == "launch"
    assert active.status_time == active.update_time
    assert active.status_time.ToDatetime() >= created.status_time.ToDatetime()
    # A no-op keeps the recorded reason and time; other writes keep them too.
    assert await set_status(stub, "alpha", ACTIVE, reason="again") == active
    renamed = await update(stub, "alpha", ["name"], name="Renamed")
    assert (renamed.status_reason, renamed.status_time) == ("launch", active.status_time)
    disabled = await set_status(stub, "alpha", DISABLED)
    assert disabled.status_reason == ""
    assert await get(stub, "alpha") == disabled


async def test_bad_status_reasons_are_refused(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.5)
    before = await stored(stub)
    for reason in ["x" * 513, "two\nlines"]:
        await invalid(set_status(stub, "alpha", ACTIVE, reason=reason), "reason")
    assert await stored(stub) == before
    assert (await set_status(stub, "alpha", ACTIVE, reason="x" * 512)).status == ACTIVE


async def test_unknown_status_is_invalid(master: RunningMaster) -> None:
    await create(master.registry, "alpha")
    for status in [0, 9]:
        request = registry_pb2.SetChallengeStatusRequest(
            slug="alpha", status=registry_pb2.ChallengeStatus.ValueType(status)
        )
        await invalid(master.registry.SetChallengeStatus(request, metadata=ADMIN), "status")


async def test_activation_over_the_emission_sum_names_the_current_sum(
    master: RunningMaster,
) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.45)
    await create(stub, "beta", 0.25)
    await create(stub, "gamma", 0.4)
    await set_status(stub, "alpha", ACTIVE)
    await set_status(stub, "beta", ACTIVE)
    before = await stored(stub)
    error = await refused(set_status(stub, "gamma", ACTIVE), Code.FAILED_PRECONDITION)
    message = error.details() or ""
    assert message.startswith("emission_share: ")
    assert "current sum 0.7 " in message
    assert "would be 1.1, over 1" in message
    assert precondition_types(error) == ["EMISSION_SUM"]
    assert await stored(stub) == before
    # Deactivating one makes room.
    await set_status(stub, "beta", INACTIVE)
    assert (await set_status(stub, "gamma", ACTIVE)).status == ACTIVE


async def test_set_status_with_stale_revision_or_unknown_slug(master: RunningMaster) -> None:
    stub = master.registry
    created = (await create(stub, "alpha")).challenge
    await update(stub, "alpha", ["name"], name="Changed")
    before = await stored(stub)
    await refused(
        set_status(stub, "alpha", ACTIVE, expected_revision=created.revision), Code.ABORTED
    )
    await refused(
        set_status(stub, "alpha", DRAFT, expected_revision=created.revision), Code.ABORTED
    )
    await refused(set_status(stub, "missing", ACTIVE), Code.NOT_FOUND)
    await invalid(set_status(stub, "Bad_Slug", ACTIVE), "slug")
    assert await stored(stub) == before


async def test_concurrent_identical_status_changes_advance_the_revision_once(
    master: RunningMaster,
) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.5)
    results = await asyncio.gather(*(set_status(stub, "alpha", ACTIVE) for _ in range(5)))
    assert {r.revision for r in results} == {2}
    assert await head(stub) == 2


# ---------------------------------------------------------------------------
# DeleteChallenge


async def test_delete(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.5)
    await create(stub, "beta", 0.1)
    await set_status(stub, "alpha", ACTIVE)
    before = await stored(stub)
    error = await refused(
        stub.DeleteChallenge(registry_pb2.DeleteChallengeRequest(slug="alpha"), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
    )
    assert "'alpha' is ACTIVE" in (error.details() or "")
    assert await stored(stub) == before

    inactive = await set_status(stub, "alpha", INACTIVE)
    await refused(
        stub.DeleteChallenge(
            registry_pb2.DeleteChallengeRequest(
                slug="alpha", expected_revision=inactive.revision - 1
            ),
            metadata=ADMIN,
        ),
        Code.ABORTED,
    )
    deleted = await stub.DeleteChallenge(
        registry_pb2.DeleteChallengeRequest(slug="alpha", expected_revision=inactive.revision),
        metadata=ADMIN,
    )
    assert deleted.revision == inactive.revision + 1
    await refused(get(stub, "alpha"), Code.NOT_FOUND)
    page = await listing(stub)
    assert [c.slug for c in page.challenges] == ["beta"]
    assert page.revision == deleted.revision

    # A DRAFT goes straight away, and the slug can be registered again.
    await stub.DeleteChallenge(registry_pb2.DeleteChallengeRequest(slug="beta"), metadata=ADMIN)
    again = await create(stub, "alpha", 0.2)
    assert again.challenge.create_revision == deleted.revision + 2


async def test_delete_unknown_or_malformed_slug(master: RunningMaster) -> None:
    stub = master.registry
    error = await refused(
        stub.DeleteChallenge(registry_pb2.DeleteChallengeRequest(slug="missing"), metadata=ADMIN),
        Code.NOT_FOUND,
    )
    assert "'missing'" in (error.details() or "")
    await invalid(
        stub.DeleteChallenge(registry_pb2.DeleteChallengeRequest(slug="-x"), metadata=ADMIN),
        "slug",
    )
    assert await head(stub) == 0


# ---------------------------------------------------------------------------
# RotateChallengeToken


async def test_rotate_issues_a_new_token_and_revokes_the_old_one(
    master: RunningMaster, database_url: str
) -> None:
    stub = master.registry
    created = await create(stub, "alpha")
    old = created.token
    assert await token_matches(database_url, "alpha", old)
    rotated = await stub.RotateChallengeToken(
        registry_pb2.RotateChallengeTokenRequest(
            slug="alpha", expected_revision=created.challenge.revision
        ),
        metadata=ADMIN,
    )
    assert rotated.token.startswith("pct_")
    assert rotated.token != old
    assert rotated.challenge.revision == created.challenge.revision + 1
    assert rotated.challenge.token_issue_time.ToDatetime() >= (
        created.challenge.token_issue_time.ToDatetime()
    )
    assert await token_matches(database_url, "alpha", rotated.token)
    assert not await token_matches(database_url, "alpha", old)
    assert not any(rotated.token.encode() in blob for blob in await stored(stub))


async def test_refused_rotations_keep_the_token(master: RunningMaster, database_url: str) -> None:
    stub = master.registry
    created = await create(stub, "alpha")
    await update(stub, "alpha", ["name"], name="Changed")
    before = await stored(stub)
    await refused(
        stub.RotateChallengeToken(
            registry_pb2.RotateChallengeTokenRequest(
                slug="alpha", expected_revision=created.challenge.revision
            ),
            metadata=ADMIN,
        ),
        Code.ABORTED,
    )
    await refused(
        stub.RotateChallengeToken(
            registry_pb2.RotateChallengeTokenRequest(slug="missing"), metadata=ADMIN
        ),
        Code.NOT_FOUND,
    )
    assert await stored(stub) == before
    assert await token_matches(database_url, "alpha", created.token)


# ---------------------------------------------------------------------------
# ListPublicChallenges


async def test_public_catalogue_lists_active_challenges_without_secrets(
    master: RunningMaster,
) -> None:
    stub = master.registry
    alpha = await stub.CreateChallenge(
        registry_pb2.CreateChallengeRequest(challenge=full_spec("alpha", 0.3)), metadata=ADMIN
    )
    await create(stub, "beta", 0.2)
    await create(stub, "gamma", 0.2)
    await set_status(stub, "alpha", ACTIVE)
    await set_status(stub, "gamma", ACTIVE)
    last = await set_status(stub, "gamma", DISABLED)

    response = await public(stub, last.revision)
    assert response.revision == last.revision
    [entry] = response.challenges
    sent = full_spec("alpha", 0.3)
    assert entry == registry_pb2.PublicChallenge(
        slug="alpha",
        name=sent.name,
        description=sent.description,
        emission_share=0.3,
        public_path="/challenges/alpha/",
        signed_path_prefixes=["/submit"],
        metadata=dict(sent.metadata),
    )
    blob = response.SerializeToString()
    for secret in [
        sent.image,
        "platform-test",
        "debug-level-sentinel",
        "LOG_LEVEL",
        "512Mi",
        "/admin",
        alpha.token,
    ]:
        assert secret.encode() not in blob, secret


async def test_public_catalogue_needs_no_credentials(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.3)
    activated = await set_status(stub, "alpha", ACTIVE)
    await public(stub, activated.revision)
    metadata: Metadata | None
    for metadata in [None, (), WRONG_TOKEN, BASIC, ADMIN]:
        response = await stub.ListPublicChallenges(
            registry_pb2.ListPublicChallengesRequest(), metadata=metadata
        )
        assert [c.slug for c in response.challenges] == ["alpha"], metadata


async def test_public_catalogue_follows_status_changes(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.3)
    activated = await set_status(stub, "alpha", ACTIVE)
    assert [c.slug for c in (await public(stub, activated.revision)).challenges] == ["alpha"]
    changed = await update(
        stub, "alpha", ["name", "emission_share"], name="Renamed", emission_share=0.4
    )
    [entry] = (await public(stub, changed.revision)).challenges
    assert (entry.name, entry.emission_share) == ("Renamed", 0.4)
    deactivated = await set_status(stub, "alpha", INACTIVE)
    assert (await public(stub, deactivated.revision)).challenges == []


# ---------------------------------------------------------------------------
# Authentication

ADMIN_CALLS: dict[str, Callable[[Stub, Metadata | None], Awaitable[Any]]] = {
    "CreateChallenge": lambda s, md: s.CreateChallenge(
        registry_pb2.CreateChallengeRequest(challenge=spec("beta")), metadata=md
    ),
    "GetChallenge": lambda s, md: s.GetChallenge(
        registry_pb2.GetChallengeRequest(slug="alpha"), metadata=md
    ),
    "ListChallenges": lambda s, md: s.ListChallenges(
        registry_pb2.ListChallengesRequest(), metadata=md
    ),
    "UpdateChallenge": lambda s, md: s.UpdateChallenge(
        registry_pb2.UpdateChallengeRequest(
            slug="alpha",
            challenge=registry_pb2.ChallengeSpec(name="Hijacked"),
            update_mask=FieldMask(paths=["name"]),
        ),
        metadata=md,
    ),
    "SetChallengeStatus": lambda s, md: s.SetChallengeStatus(
        registry_pb2.SetChallengeStatusRequest(slug="alpha", status=DISABLED), metadata=md
    ),
    "RotateChallengeToken": lambda s, md: s.RotateChallengeToken(
        registry_pb2.RotateChallengeTokenRequest(slug="alpha"), metadata=md
    ),
    "DeleteChallenge": lambda s, md: s.DeleteChallenge(
        registry_pb2.DeleteChallengeRequest(slug="alpha"), metadata=md
    ),
}


def test_every_admin_rpc_of_the_contract_is_covered() -> None:
    service = registry_pb2.DESCRIPTOR.services_by_name["Registry"]
    admin = {
        m.name
        for m in service.methods
        if m.GetOptions().Extensions[common_pb2.auth] == common_pb2.AUTH_POLICY_ADMIN
    }
    assert admin == set(ADMIN_CALLS)


BAD_CREDENTIALS: list[tuple[Metadata | None, str]] = [
    (None, "missing credentials"),
    ((), "missing credentials"),
    (BASIC, "missing credentials"),
    ((("authorization", "Bearer "),), "missing credentials"),
    (WRONG_TOKEN, "invalid admin token"),
    ((("authorization", "Bearer " + ADMIN[0][1].split()[1][:-1]),), "invalid admin token"),
    ((("x-admin-token", ADMIN[0][1].split()[1]),), "missing credentials"),
]


async def test_admin_rpcs_refuse_missing_or_wrong_credentials(
    master: RunningMaster, database_url: str
) -> None:
    stub = master.registry
    created = await create(stub, "alpha", 0.2)
    before = await stored(stub)
    for rpc, call in ADMIN_CALLS.items():
        for metadata, says in BAD_CREDENTIALS:
            error = await refused(call(stub, metadata), Code.UNAUTHENTICATED)
            assert says in (error.details() or ""), (rpc, metadata, error.details())
    assert await stored(stub) == before
    assert await token_matches(database_url, "alpha", created.token)
    # The same calls with the admin token go through (in an order where each can succeed).
    for call in ADMIN_CALLS.values():
        await call(stub, ADMIN)


# ---------------------------------------------------------------------------
# Nothing stored changes on a refused write


RefusedWrite = Callable[[Stub], Awaitable[Any]]
REFUSED_WRITES: list[tuple[str, RefusedWrite, grpc.StatusCode]] = [
    ("create-duplicate", lambda s: create(s, "active", 0.1, name="Dup"), Code.ALREADY_EXISTS),
    ("create-invalid", lambda s: create(s, "new", 3.0), Code.INVALID_ARGUMENT),
    ("update-empty-mask", lambda s: update(s, "draft", [], name="x"), Code.INVALID_ARGUMENT),
    ("update-slug", lambda s: update(s, "draft", ["slug"], slug="other"), Code.INVALID_ARGUMENT),
    ("update-status", lambda s: update(s, "draft", ["status"]), Code.INVALID_ARGUMENT),
    (
        "update-bad-value",
        lambda s: update(s, "draft", ["name", "image"], name="ok", image="BAD"),
        Code.INVALID_ARGUMENT,
    ),
    ("update-stale", lambda s: update(s, "draft", ["name"], 1, name="x"), Code.ABORTED),
    (
        "update-active-share",
        lambda s: update(s, "active", ["emission_share"], emission_share=0.95),
        Code.FAILED_PRECONDITION,
    ),
    ("activate-over-sum", lambda s: set_status(s, "draft", ACTIVE), Code.FAILED_PRECONDITION),
    ("illegal-transition", lambda s: set_status(s, "disabled", ACTIVE), Code.FAILED_PRECONDITION),
    (
        "delete-active",
        lambda s: s.DeleteChallenge(
            registry_pb2.DeleteChallengeRequest(slug="active"), metadata=ADMIN
        ),
        Code.FAILED_PRECONDITION,
    ),
    (
        "rotate-stale",
        lambda s: s.RotateChallengeToken(
            registry_pb2.RotateChallengeTokenRequest(slug="draft", expected_revision=1),
            metadata=ADMIN,
        ),
        Code.ABORTED,
    ),
]


async def test_a_refused_write_changes_nothing(master: RunningMaster) -> None:
    stub = master.registry
    await create(stub, "active", 0.6)
    await create(stub, "other", 0.3)
    await create(stub, "disabled", 0.1)
    await create(stub, "draft", 0.5)
    await set_status(stub, "active", ACTIVE)
    await set_status(stub, "other", ACTIVE)
    await set_status(stub, "disabled", DISABLED)
    await update(stub, "draft", ["description"], description="moved past revision 1")
    before = await stored(stub)
    for name, write, code in REFUSED_WRITES:
        await refused(write(stub), code)
        assert await stored(stub) == before, name
    # The next accepted write takes the very next revision: the refusals consumed none.
    revision = (await listing(stub)).revision
    assert (await update(stub, "draft", ["name"], name="Next")).revision == revision + 1


# ---------------------------------------------------------------------------
# Metadata scalars survive storage exactly (JSON text on both backends)


async def test_metadata_scalars_keep_their_type(
    master: RunningMaster,
) -> None:
    values: dict[str, str | int | float | bool] = {
        "homepage": "https://example.org",
        "version": 2**62,
        "documentation": 2.0,
        "contact": False,
        "category": 1e16,
    }
    metadata = {k: scalar(v) for k, v in values.items()}
    await create(master.registry, "alpha", metadata=metadata)
    got = await get(master.registry, "alpha")
    assert dict(got.metadata) == metadata


async def test_a_large_metadata_double_does_not_stall_the_registry(
    master: RunningMaster,
) -> None:
    stub = master.registry
    await create(stub, "alpha", 0.1, metadata={"version": scalar(1e20)})
    await create(stub, "beta", 0.1)
    activated = await set_status(stub, "beta", ACTIVE)
    response = await public(stub, activated.revision, within=1.5)
    assert [c.slug for c in response.challenges] == ["beta"]
    assert (await get(stub, "alpha")).metadata["version"].double_value == 1e20


async def test_a_nul_in_a_metadata_string_is_refused_precisely(
    master: RunningMaster,
) -> None:
    stub = master.registry
    metadata = {"category": scalar("a\x00b")}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create(stub, "alpha", metadata=metadata)
    assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()
    assert bad_request_fields(info.value) == ["challenge.metadata['category']"]
    assert await head(stub) == 0
