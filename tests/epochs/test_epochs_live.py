"""Epochs over real challenges: example processes behind real shims, the local subnet below."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bittensor.intents.weights import clip_to_max_weight, normalize

from platform_common import vectors
from platform_common.chain import dev_keypair
from platform_common.keys import load_signer
from platform_network.v1 import weights_pb2
from tests.epochs.conftest import MASTER_KEY, EpochMaster, Subnet, start_epoch_master
from tests.epochs.live import LiveChallenge, launch, register, write_endpoints

Status = weights_pb2.ChallengeEpochStatus
Failure = weights_pb2.ChallengeFailure
COLLECT_TIMEOUT = 3.0


def miner(uid: int) -> str:
    return str(dev_keypair("hotkey", uid).ss58_address)


@pytest.fixture
def live() -> Iterator[list[LiveChallenge]]:
    started: list[LiveChallenge] = []
    try:
        yield started
    finally:
        for challenge in started:
            challenge.stop()


@pytest.fixture
async def live_master(
    database_url: str, subnet: Subnet, token_key_file: Path, tmp_path: Path
) -> AsyncIterator[EpochMaster]:
    """An epoch master placing challenges by ``tmp_path / "shims.json"`` (see write_endpoints)."""
    master = await start_epoch_master(
        database_url,
        subnet,
        token_key_file,
        shim_endpoints_file=str(tmp_path / "shims.json"),
        collect_timeout=COLLECT_TIMEOUT,
    )
    try:
        yield master
    finally:
        await master.close()


# Both tests run on SQLite: the live part is the collection; the stores' behaviour on
# both backends is covered by test_weights_service.
pytestmark = [pytest.mark.process, pytest.mark.parametrize("backend", ["sqlite"], indirect=True)]


async def test_an_epoch_over_both_examples_matches_a_hand_computation(
    live_master: EpochMaster, tmp_path: Path, live: list[LiveChallenge]
) -> None:
    master = live_master
    native_token = await register(master.registry, "sum-native", 0.5)
    http_token = await register(master.registry, "sum-http", 0.25)
    live.append(launch(tmp_path, "sum-native", native_token, kind="native"))
    live.append(launch(tmp_path, "sum-http", http_token, kind="http"))
    write_endpoints(tmp_path / "shims.json", live)
    native, http = live
    # native: uid 5 solves 2 tasks, uid 6 one; http: uid 6 three, uid 7 one, and a
    # hotkey that is not registered on the subnet one (ignored, not refused).
    await native.solve(miner(5), 2)
    await native.solve(miner(6), 1)
    await http.solve(miner(6), 3)
    await http.solve(miner(7), 1)
    await http.solve(dev_keypair("unregistered", 1).ss58_address, 1)

    epoch = await master.seal()

    results = {r.slug: r for r in epoch.challenges}
    assert [r.slug for r in epoch.challenges] == ["sum-http", "sum-native"]
    assert results["sum-native"].status == Status.CHALLENGE_EPOCH_STATUS_OK
    assert results["sum-http"].status == Status.CHALLENGE_EPOCH_STATUS_OK
    assert results["sum-native"].scoring_version == "sum-v1"
    assert results["sum-http"].raw_entry_count == 3
    assert results["sum-http"].paid_entry_count == 2
    assert results["sum-native"].share_applied == 0.5
    # By hand: native pays 0.5 x (2/3, 1/3) to uids 5 and 6; http pays 0.25 x (3/4, 1/4)
    # to uids 6 and 7; the unallocated 0.25 goes to the burn UID 0.
    expected = {0: 0.25, 5: 0.5 * 2 / 3, 6: 0.5 / 3 + 0.25 * 3 / 4, 7: 0.25 / 4}
    got = {w.uid: w.weight for w in epoch.vector.weights}
    assert got.keys() == expected.keys()
    for uid, weight in expected.items():
        assert math.isclose(got[uid], weight, rel_tol=1e-12), (uid, got[uid], weight)
    assert epoch.vector.weights[1].hotkey == miner(5)
    assert math.isclose(epoch.burn_weight, 0.25, rel_tol=1e-12)
    # The u16 form is the SDK's own conversion of the float vector (max weight
    # limit and min allowed weights of the local subnet's hyperparameters).
    chain = epoch.vector.chain_weights
    uids = sorted(got)
    clipped = clip_to_max_weight([got[u] for u in uids], chain.max_weight_limit / 65535)
    sdk_uids, sdk_values = normalize(uids, clipped)
    assert list(chain.uids) == list(sdk_uids)
    assert list(chain.values) == list(sdk_values)
    assert max(chain.values) == 65535
    vectors.verify_vector(epoch.vector, load_signer(MASTER_KEY).ss58_address)


# slug -> (example, fault, expected failure, words the reason must contain)
FAULTS: dict[str, tuple[str, str, int, tuple[str, ...]]] = {
    "hangs": ("native", "hang", Failure.CHALLENGE_FAILURE_TIMEOUT, ("no answer within 3s",)),
    "crashes": ("native", "crash", Failure.CHALLENGE_FAILURE_UNREACHABLE, ("UNAVAILABLE",)),
    "nan-http": (
        "http",
        "nan",
        Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
        ("score", "must be finite and >= 0", "NaN"),
    ),
    "inf": ("native", "inf", Failure.CHALLENGE_FAILURE_INVALID_RESPONSE, ("score", "inf")),
    "negative": (
        "native",
        "negative",
        Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
        ("score", "got -1"),
    ),
    "bad-ss58-http": (
        "http",
        "bad-ss58",
        Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
        ("hotkey", "not a valid SS58 address", "checksum"),
    ),
    "huge": (
        "native",
        "huge",
        Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
        ("RESOURCE_EXHAUSTED",),
    ),
    "unhealthy": (
        "native",
        "unhealthy",
        Failure.CHALLENGE_FAILURE_UNHEALTHY,
        ("NOT_SERVING", "fault injected"),
    ),
    "errors-http": ("http", "error", Failure.CHALLENGE_FAILURE_ERROR, ("challenge answered",)),
}


async def test_failing_challenges_are_failed_with_reasons_and_the_others_are_paid(
    live_master: EpochMaster, tmp_path: Path, live: list[LiveChallenge]
) -> None:
    master = live_master
    share = 0.07
    tokens = {
        slug: await register(master.registry, slug, share)
        for slug in ["ok-native", "ok-http", "wrong-token", "not-running", "unshielded", *FAULTS]
    }
    plans = [
        ("ok-native", "native", "", None, True),
        ("ok-http", "http", "", None, True),
        ("wrong-token", "native", "", "another-token-0123456789abcdef0123", True),
        # No shim: only the master's own check of the answer stands in the way.
        ("unshielded", "native", "nan", None, False),
        *((slug, kind, fault, None, True) for slug, (kind, fault, _, _) in FAULTS.items()),
    ]
    launched = await asyncio.gather(
        *(
            asyncio.to_thread(
                launch,
                tmp_path,
                slug,
                tokens[slug],
                kind=kind,
                fault=fault,
                shim_token=other,
                with_shim=with_shim,
            )
            for slug, kind, fault, other, with_shim in plans
        )
    )
    live.extend(launched)
    write_endpoints(tmp_path / "shims.json", live)
    by_slug = {c.slug: c for c in live}
    await by_slug["ok-native"].solve(miner(5), 1)
    await by_slug["ok-http"].solve(miner(6), 1)
    for slug in ("nan-http", "bad-ss58-http", "inf", "negative", "unshielded"):
        await by_slug[slug].solve(miner(9), 1)  # so the fault has something to spoil

    epoch = await master.seal()

    results = {r.slug: r for r in epoch.challenges}
    assert results["ok-native"].status == Status.CHALLENGE_EPOCH_STATUS_OK
    assert results["ok-http"].status == Status.CHALLENGE_EPOCH_STATUS_OK
    expected = {
        **{slug: (failure, words) for slug, (_, _, failure, words) in FAULTS.items()},
        "wrong-token": (Failure.CHALLENGE_FAILURE_AUTH, ("UNAUTHENTICATED",)),
        "not-running": (Failure.CHALLENGE_FAILURE_INTERNAL, ("no running instance",)),
        "unshielded": (
            Failure.CHALLENGE_FAILURE_INVALID_RESPONSE,
            ("].score: must be finite and >= 0; got NaN",),
        ),
    }
    for slug, (failure, words) in expected.items():
        result = results[slug]
        assert result.status == Status.CHALLENGE_EPOCH_STATUS_FAILED, (slug, result)
        assert result.failure == failure, (slug, Failure.Name(result.failure), result.reason)
        for word in words:
            assert word in result.reason, (slug, result.reason)
        assert result.share_applied == 0.0
        assert not result.raw_sha256
        # Every call was cut off by its deadline, whatever the challenge did.
        assert result.latency.ToTimedelta().total_seconds() < COLLECT_TIMEOUT + 1.0, slug
    paid = {w.uid: w.weight for w in epoch.vector.weights}
    assert paid.keys() == {0, 5, 6}
    assert math.isclose(paid[5], share, rel_tol=1e-12)
    assert math.isclose(paid[6], share, rel_tol=1e-12)
    assert math.isclose(paid[0], 1 - 2 * share, rel_tol=1e-12)
    assert math.isclose(epoch.forfeited_share, len(expected) * share, rel_tol=1e-12)
