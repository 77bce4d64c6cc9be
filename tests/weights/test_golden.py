"""Golden allocations: hand-computed inputs and vectors (golden_vectors.json), and the
refusals of inputs that break their rules."""

from __future__ import annotations

import gc
import math
import re
from typing import Any

import pytest

from platform_common.weights import (
    PPB,
    Allocation,
    ChallengeInput,
    Outcome,
    Policy,
    allocate,
)
from tests.weights.golden import GoldenCase, load_cases

CASES = load_cases()


def test_the_golden_file_covers_what_it_must() -> None:
    names = {case.name for case in CASES}
    assert len(names) == len(CASES) >= 8
    outcomes = {
        (case.policy, outcome)
        for case in CASES
        for outcome in (c["outcome"] for c in case.expected["challenges"])
    }
    for policy in Policy:
        assert (policy, "failed") in outcomes
        assert (policy, "empty") in outcomes


def _same(actual: float, expected: float, rel_tol: float | None) -> bool:
    if rel_tol is None:
        return actual == expected
    return math.isclose(actual, expected, rel_tol=rel_tol, abs_tol=0.0)


def _as_plain(allocation: Allocation) -> dict[str, Any]:
    return {
        "weights": [[uid, weight] for uid, weight in allocation.weights],
        "challenges": [
            {
                "slug": c.slug,
                "outcome": c.outcome.value,
                "share_assigned": c.share_assigned,
                "share_applied": c.share_applied,
                "paid_entry_count": c.paid_entry_count,
                "reason": c.reason,
            }
            for c in allocation.challenges
        ],
        "unallocated_share": allocation.unallocated_share,
        "forfeited_share": allocation.forfeited_share,
        "burn_weight": allocation.burn_weight,
    }


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_golden_allocation(case: GoldenCase) -> None:
    allocation = allocate(
        case.challenges, case.metagraph, burn_uid=case.burn_uid, policy=case.policy
    )
    actual = _as_plain(allocation)
    expected = case.expected
    shown = f"{case.name}: got {actual}"

    assert [uid for uid, _ in actual["weights"]] == [uid for uid, _ in expected["weights"]], shown
    for (_, got), (_, want) in zip(actual["weights"], expected["weights"], strict=True):
        assert _same(got, want, case.rel_tol), shown
    for key in ("unallocated_share", "forfeited_share", "burn_weight"):
        assert _same(actual[key], expected[key], case.rel_tol), f"{key}: {shown}"
    assert len(actual["challenges"]) == len(expected["challenges"]), shown
    for got_c, want_c in zip(actual["challenges"], expected["challenges"], strict=True):
        for key in ("slug", "outcome", "paid_entry_count", "reason"):
            assert got_c[key] == want_c[key], f"{key}: {shown}"
        for key in ("share_assigned", "share_applied"):
            assert _same(got_c[key], want_c[key], case.rel_tol), f"{key}: {shown}"


def test_exact_cases_sum_to_exactly_one() -> None:
    for case in CASES:
        if case.rel_tol is None:
            allocation = allocate(
                case.challenges, case.metagraph, burn_uid=case.burn_uid, policy=case.policy
            )
            assert sum(weight for _, weight in allocation.weights) == 1.0, case.name


def test_inputs_are_not_changed() -> None:
    scores = [("ana", 1.0), ("ben", 3.0)]
    metagraph = {"ana": 1, "ben": 2}
    allocate([ChallengeInput("alpha", PPB, scores)], metagraph, burn_uid=0, policy=Policy.BURN)
    assert scores == [("ana", 1.0), ("ben", 3.0)]
    assert metagraph == {"ana": 1, "ben": 2}


def test_a_subnormal_score_that_underflows_is_left_out_but_counted() -> None:
    # 5e-324 / 1e300 underflows to 0.0: the hotkey counts as paid (its score is > 0),
    # yet the vector carries weights > 0 only.
    allocation = allocate(
        [ChallengeInput("alpha", PPB, [("ana", 5e-324), ("ben", 1e300)])],
        {"ana": 1, "ben": 2},
        burn_uid=0,
        policy=Policy.BURN,
    )
    assert allocation.weights == ((2, 1.0),)
    assert allocation.challenges[0].paid_entry_count == 2
    assert allocation.challenges[0].outcome is Outcome.OK


def test_an_all_zero_answer_is_empty() -> None:
    allocation = allocate(
        [ChallengeInput("alpha", PPB, [("ana", 0.0), ("ben", -0.0)])],
        {"ana": 1, "ben": 2},
        burn_uid=0,
        policy=Policy.BURN,
    )
    assert allocation.weights == ((0, 1.0),)
    assert allocation.challenges[0].outcome is Outcome.EMPTY
    assert allocation.challenges[0].reason == (
        "no registered, non-burn hotkey scored > 0 (2 entries: 2 scored 0)"
    )


@pytest.mark.parametrize(
    ("challenges", "metagraph", "burn_uid", "message"),
    [
        (
            [ChallengeInput("alpha", PPB + 1, [])],
            {},
            0,
            "challenges[0].share_ppb: must be an integer in 0..1000000000; got 1000000001",
        ),
        (
            [ChallengeInput("alpha", -1, [])],
            {},
            0,
            "challenges[0].share_ppb: must be an integer in 0..1000000000; got -1",
        ),
        (
            [ChallengeInput("alpha", 0.5, [])],  # type: ignore[arg-type]
            {},
            0,
            "challenges[0].share_ppb: must be an integer in 0..1000000000; got 0.5",
        ),
        (
            [ChallengeInput("alpha", 600_000_000, []), ChallengeInput("beta", 400_000_001, [])],
            {},
            0,
            "challenges: the shares sum to 1000000001 ppb, over 1 (1000000000 ppb)",
        ),
        (
            [ChallengeInput("alpha", 1, []), ChallengeInput("alpha", 1, None)],
            {},
            0,
            "challenges[1].slug: 'alpha' duplicates challenges[0]",
        ),
        (
            [ChallengeInput("alpha", 1, [("ana", 1.0), ("ben", math.nan)])],
            {},
            0,
            "challenges[0].scores[1]: score must be finite and >= 0; got nan",
        ),
        (
            [ChallengeInput("alpha", 1, [("ana", -1.0)])],
            {},
            0,
            "challenges[0].scores[0]: score must be finite and >= 0; got -1.0",
        ),
        (
            [ChallengeInput("alpha", 1, [("ana", 1.0), ("ben", math.inf)])],
            {},
            0,
            "challenges[0].scores[1]: score must be finite and >= 0; got inf",
        ),
        (
            [ChallengeInput("alpha", 1, [("ana", 1e308), ("ben", 1e308)])],
            {},
            0,
            "challenges[0].scores: the scores sum to infinity",
        ),
        (
            [ChallengeInput("alpha", 1, [("ana", 1.0), ("ben", 1.0), ("ana", 2.0)])],
            {},
            0,
            "challenges[0].scores[2]: duplicate hotkey 'ana' (also at scores[0])",
        ),
        ([], {}, 65_536, "burn_uid: must be in 0..65535; got 65536"),
        ([], {}, -1, "burn_uid: must be in 0..65535; got -1"),
        (
            [ChallengeInput("alpha", 1, [("ana", 1.0)])],
            {"ana": 70_000},
            0,
            "hotkey_to_uid: UID 70000 is outside 0..65535",
        ),
        (
            [ChallengeInput("alpha", 1, [("ana", 1.0)])],
            {"ana": -3},
            0,
            "hotkey_to_uid: UID -3 is outside 0..65535",
        ),
    ],
)
def test_inputs_breaking_their_rules_are_refused(
    challenges: list[ChallengeInput], metagraph: dict[str, int], burn_uid: int, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        allocate(challenges, metagraph, burn_uid=burn_uid, policy=Policy.BURN)


def test_the_garbage_collector_is_left_as_found() -> None:
    # allocate defers the collector while it runs, on every path out.
    answer = [ChallengeInput("alpha", PPB, [("ana", 1.0)])]
    assert gc.isenabled()
    allocate(answer, {"ana": 1}, burn_uid=0, policy=Policy.BURN)
    assert gc.isenabled()
    with pytest.raises(ValueError, match="score must be finite"):
        allocate(
            [ChallengeInput("alpha", PPB, [("ana", math.nan)])],
            {"ana": 1},
            burn_uid=0,
            policy=Policy.BURN,
        )
    assert gc.isenabled()
    gc.disable()
    try:
        allocate(answer, {"ana": 1}, burn_uid=0, policy=Policy.BURN)
        assert not gc.isenabled()
    finally:
        gc.enable()
