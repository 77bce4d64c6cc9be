from __future__ import annotations

import grpc

from platform_network.v1 import registry_pb2
from tests.helpers import ACTIVE, INACTIVE, create, refused, set_status
from tests.support.master import ADMIN, RunningMaster


async def test_create_then_get(master: RunningMaster) -> None:
    created = await create(master.registry, "alpha", 0.4)
    assert created.token.startswith("pct_")
    got = await master.registry.GetChallenge(
        registry_pb2.GetChallengeRequest(slug="alpha"), metadata=ADMIN
    )
    assert got.slug == "alpha"
    assert got.revision == created.challenge.revision


async def test_emission_sum_refused(master: RunningMaster) -> None:
    await create(master.registry, "alpha", 0.7)
    await create(master.registry, "beta", 0.4)
    await set_status(master.registry, "alpha", ACTIVE)
    error = await refused(
        set_status(master.registry, "beta", ACTIVE), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "current sum 0.7" in (error.details() or "")


async def test_status_reason_is_stored_and_repeating_a_status_changes_nothing(
    master: RunningMaster,
) -> None:
    await create(master.registry, "alpha", 0.2)
    active = await set_status(master.registry, "alpha", ACTIVE, reason="season 3 opens")
    assert active.status_reason == "season 3 opens"
    assert active.status_time.ToDatetime() >= active.create_time.ToDatetime()
    again = await set_status(master.registry, "alpha", ACTIVE, reason="retry")
    assert again.revision == active.revision
    assert again.status_reason == "season 3 opens"
    listing = await master.registry.ListChallenges(
        registry_pb2.ListChallengesRequest(), metadata=ADMIN
    )
    assert listing.revision == active.revision
    error = await refused(
        set_status(master.registry, "alpha", INACTIVE, reason="x" * 513),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "reason: must be at most 512 characters" in (error.details() or "")
