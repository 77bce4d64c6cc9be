"""The whole-answer checks of platform_common.answers refuse exactly what the
entry-by-entry rules refuse, with the same message, and the cache of valid SS58
addresses stays bounded.

A valid answer is checked with set operations, ``sum``/``min`` and the address
cache; only a broken one is walked entry by entry. These tests compare both on
random answers mixing every kind of fault.
"""

from __future__ import annotations

import math
import random

import pytest
from bittensor.sp_core import Keypair

from platform_common import answers, ss58
from platform_common.answers import Limits, Rule, WeightsRefused, check_entries
from platform_network.v1 import challenge_pb2

LIMITS = Limits()
VALID = [Keypair.create_from_uri(f"//fast-path-{i}").ss58_address for i in range(24)]
INVALID = [
    VALID[0][:-1] + ("Z" if VALID[0][-1] != "Z" else "Y"),  # bad checksum
    "0OIl" + VALID[1][4:],  # not base58
    VALID[2][:20],  # wrong length
    "",
    "5" * 60,
]
SCORES = [0.0, -0.0, 1.0, 3.5, 1e-300, 7e307, -1.0, -1e-9, math.nan, math.inf, -math.inf]
LABELS = ["", "v3", "x" * 128, "x" * 129, "v1\n", "vé", " ~", "\x7f"]


def reference(hotkeys: list[str], scores: list[float], label: str) -> WeightsRefused | None:
    """The rules applied entry by entry, in the contract's order."""
    try:
        answers.check_count(len(hotkeys), LIMITS)
        answers._check_rule(Rule.HOTKEY, answers._hotkey_violations(hotkeys))
        answers._check_rule(Rule.DUPLICATE, answers._duplicate_violations(hotkeys))
        answers._check_rule(Rule.SCORE, answers._score_violations(scores))
        answers._check_rule(Rule.LABEL, answers._label_violations(label))
    except WeightsRefused as refused:
        return refused
    return None


def outcome(refused: WeightsRefused | None) -> object:
    if refused is None:
        return None
    return (refused.rule, refused.message, refused.total, refused.violations)


def random_answer(rng: random.Random) -> tuple[list[str], list[float], str]:
    size = rng.choice([0, 1, 2, 5, 40])
    pool = VALID + INVALID * rng.choice([0, 0, 1])
    hotkeys = [rng.choice(pool) for _ in range(size)] if rng.random() < 0.3 else []
    if not hotkeys:
        hotkeys = rng.sample(VALID, min(size, len(VALID)))
        if hotkeys and rng.random() < 0.2:
            hotkeys.append(rng.choice(hotkeys))  # one duplicate
    good = [0.0, 1.0, 2.5, 10.0, 1e-300]
    scores = [rng.choice(SCORES if rng.random() < 0.1 else good) for _ in hotkeys]
    if scores and rng.random() < 0.05:
        scores = [1.7e308] * len(scores)  # finite scores, infinite sum
    label = rng.choice(LABELS) if rng.random() < 0.3 else "v1"
    return hotkeys, scores, label


def test_the_fast_checks_refuse_exactly_what_the_rules_refuse() -> None:
    rng = random.Random(20260522)
    seen: set[object] = set()
    for _ in range(3000):
        hotkeys, scores, label = random_answer(rng)
        expected = reference(hotkeys, scores, label)
        try:
            check_entries(hotkeys, scores, label, LIMITS)
            got = None
        except WeightsRefused as refused:
            got = refused
        assert outcome(got) == outcome(expected), (hotkeys, scores, label)
        seen.add(None if expected is None else expected.rule)
    # The random answers reached every rule, and valid answers too.
    assert seen == {None, Rule.HOTKEY, Rule.DUPLICATE, Rule.SCORE, Rule.LABEL}


@pytest.mark.parametrize("score", SCORES)
def test_each_score_alone(score: float) -> None:
    hotkeys, scores = VALID[:3], [1.0, score, 2.0]
    assert outcome(_refusal(hotkeys, scores)) == outcome(reference(hotkeys, scores, ""))


@pytest.mark.parametrize("label", LABELS)
def test_each_label_alone(label: str) -> None:
    assert outcome(_refusal(VALID[:2], [1.0, 1.0], label)) == outcome(
        reference(VALID[:2], [1.0, 1.0], label)
    )


def test_validation_reads_the_entries_once_and_returns_them() -> None:
    response = challenge_pb2.GetWeightsResponse(scoring_version="v1")
    for hotkey, score in zip(VALID[:5], [1.0, 0.0, 2.0, 3.0, 4.0], strict=True):
        response.entries.add(hotkey=hotkey, score=score)
    answer = answers.read_grpc_answer(response.SerializeToString(), LIMITS)
    assert answer.hotkeys == VALID[:5]
    assert answer.scores == [1.0, 0.0, 2.0, 3.0, 4.0]
    assert answer.response == response


def test_all_valid_checks_unknown_addresses_and_remembers_the_valid_ones() -> None:
    fresh = Keypair.create_from_uri("//fast-path-fresh").ss58_address
    ss58._valid_cache.pop(fresh, None)
    assert ss58.all_valid([fresh, VALID[0]])
    assert fresh in ss58._valid_cache
    for bad in INVALID:
        assert not ss58.all_valid([VALID[0], bad])
        assert bad not in ss58._valid_cache
    assert ss58.all_valid([])


def test_the_cache_of_valid_addresses_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ss58, "_CACHE_LIMIT", 8)
    monkeypatch.setattr(ss58, "_valid_cache", {})
    addresses = [Keypair.create_from_uri(f"//fast-path-bound-{i}").ss58_address for i in range(40)]
    assert ss58.all_valid(addresses)
    assert len(ss58._valid_cache) <= 8
    # Evicted addresses are still valid: they are checked again.
    assert all(ss58.is_valid(a) for a in addresses)
    assert len(ss58._valid_cache) <= 8


def _refusal(hotkeys: list[str], scores: list[float], label: str = "") -> WeightsRefused | None:
    try:
        check_entries(hotkeys, scores, label, LIMITS)
    except WeightsRefused as refused:
        return refused
    return None
