"""Parallel writers through two master replicas cannot break the emission invariant."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import field_mask_pb2

from master.registry.rules import PPB, share_to_ppb
from platform_network.v1 import registry_pb2
from tests.helpers import ACTIVE, create, set_status
from tests.support.master import ADMIN, start_master


async def _outcome(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def test_parallel_activations_never_exceed_the_emission_sum(database_url: str) -> None:
    first = await start_master(database_url)
    second = await start_master(database_url)
    try:
        slugs = [f"c{i:02d}" for i in range(12)]
        for slug in slugs:
            await create(first.registry, slug, 0.3)
        # 12 activations of 0.3 at once, spread over both replicas: only 3 fit under 1.
        calls = [
            set_status((first if i % 2 else second).registry, slug, ACTIVE)
            for i, slug in enumerate(slugs)
        ]
        outcomes = await asyncio.gather(*(_outcome(c) for c in calls))
        assert sorted(outcomes) == ["FAILED_PRECONDITION"] * 9 + ["OK"] * 3

        listing = await first.registry.ListChallenges(
            registry_pb2.ListChallengesRequest(statuses=[ACTIVE]), metadata=ADMIN
        )
        assert len(listing.challenges) == 3
        assert sum(share_to_ppb(c.emission_share) for c in listing.challenges) <= PPB
        # Every accepted write got exactly one revision: 12 creates + 3 activations.
        assert listing.revision == 15
    finally:
        await first.close()
        await second.close()


async def test_parallel_share_raises_never_exceed_the_emission_sum(database_url: str) -> None:
    first = await start_master(database_url)
    second = await start_master(database_url)
    try:
        for slug in ("a", "b", "c", "d"):
            await create(first.registry, slug, 0.1)
            await set_status(first.registry, slug, ACTIVE)
        # 4 x 0.1 are ACTIVE. One raise to 0.5 fits (sum 0.8); a second one would
        # make 1.2. Four raises at once: exactly one wins.
        calls = [
            (first if i % 2 else second).registry.UpdateChallenge(
                registry_pb2.UpdateChallengeRequest(
                    slug=slug,
                    challenge=registry_pb2.ChallengeSpec(emission_share=0.5),
                    update_mask=field_mask_pb2.FieldMask(paths=["emission_share"]),
                ),
                metadata=ADMIN,
            )
            for i, slug in enumerate(("a", "b", "c", "d"))
        ]
        outcomes = await asyncio.gather(*(_outcome(c) for c in calls))
        assert sorted(outcomes) == ["FAILED_PRECONDITION"] * 3 + ["OK"]
        listing = await second.registry.ListChallenges(
            registry_pb2.ListChallengesRequest(statuses=[ACTIVE]), metadata=ADMIN
        )
        total = sum(share_to_ppb(c.emission_share) for c in listing.challenges)
        assert total == share_to_ppb(0.8)
    finally:
        await first.close()
        await second.close()
