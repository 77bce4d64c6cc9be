"""Production policy at the API: pinned images from allowlisted namespaces; tokens as hashes."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import select

from master.db.engine import create_engine
from master.db.models import ChallengeRow
from platform_common import tokens
from tests.helpers import create, refused
from tests.support.master import start_master

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_production_requires_pinned_allowlisted_images(database_url: str) -> None:
    running = await start_master(
        database_url, production=True, image_allowlist=("ghcr.io/subnet-org",)
    )
    try:
        ok = await create(
            running.registry, "pinned", image=f"ghcr.io/subnet-org/pinned:1.2@{DIGEST}"
        )
        assert ok.challenge.image.endswith(DIGEST)

        no_digest = await refused(
            create(running.registry, "tagged", image="ghcr.io/subnet-org/tagged:1.2"),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "challenge.image: production mode requires a tag and a sha256 digest" in (
            no_digest.details() or ""
        )
        elsewhere = await refused(
            create(running.registry, "other", image=f"ghcr.io/subnet-org-evil/x:1@{DIGEST}"),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "not under an allowlisted namespace (ghcr.io/subnet-org)" in (
            elsewhere.details() or ""
        )
    finally:
        await running.close()


async def test_only_a_digest_of_the_token_is_stored(database_url: str) -> None:
    running = await start_master(database_url)
    try:
        created = await create(running.registry, "alpha")
    finally:
        await running.close()
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(ChallengeRow))).one()
    finally:
        await engine.dispose()
    assert row.token_sha256 == tokens.digest(created.token)
    assert created.token.encode() not in repr(tuple(row)).encode()
