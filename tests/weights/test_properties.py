"""Properties of the allocation over generated epochs (hypothesis)."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from platform_common.weights import (
    PPB,
    Allocation,
    ChallengeInput,
    Outcome,
    Policy,
    allocate,
)

HOTKEYS = [f"hk{i}" for i in range(12)]
UNREGISTERED = ["nobody", "stranger"]


@st.composite
def epochs(
    draw: st.DrawFn, *, scores: st.SearchStrategy[float] | None = None
) -> tuple[list[ChallengeInput], dict[str, int], int]:
    """Challenges (shares summing to <= 1), a metagraph and a burn UID."""
    # Small UIDs make a dense metagraph, large ones a sparse one: the allocation sums
    # UIDs paid by several challenges differently in each case.
    top_uid = draw(st.sampled_from([len(HOTKEYS) + 3, 65_535]))
    uids = draw(
        st.lists(st.integers(0, top_uid), min_size=len(HOTKEYS), max_size=len(HOTKEYS), unique=True)
    )
    registered = draw(st.integers(1, len(HOTKEYS)))
    metagraph = dict(zip(HOTKEYS[:registered], uids[:registered], strict=True))
    # The burn UID is often a registered hotkey's (the owner scores in a challenge).
    burn_uid = draw(st.sampled_from(uids[:registered]) | st.integers(0, top_uid))
    count = draw(st.integers(0, 6))
    # Cut points in 0..1e9 give shares summing to at most 1, zero shares included.
    cuts = sorted(draw(st.lists(st.integers(0, PPB), min_size=count, max_size=count)))
    top = draw(st.sampled_from([PPB, cuts[-1] if cuts else 0]))
    edges = [0, *cuts]
    shares = [edges[i + 1] - edges[i] for i in range(count)]
    if shares and top == PPB:
        shares[-1] += PPB - edges[-1]
    score_values = (
        scores
        if scores is not None
        else (
            st.sampled_from([0.0, 1.0, 2.0, 0.5])
            | st.floats(0.0, 1e300, allow_nan=False, allow_infinity=False)
        )
    )
    challenges = []
    for index, share in enumerate(shares):
        if draw(st.integers(0, 5)) == 0:
            challenges.append(ChallengeInput(f"c{index}", share, None))
            continue
        names = draw(st.lists(st.sampled_from(HOTKEYS + UNREGISTERED), unique=True, max_size=8))
        answer = [(name, draw(score_values)) for name in names]
        challenges.append(ChallengeInput(f"c{index}", share, answer))
    return challenges, metagraph, burn_uid


POLICIES = st.sampled_from(list(Policy))


def _check_shape(allocation: Allocation) -> None:
    uids = [uid for uid, _ in allocation.weights]
    assert uids, "never empty"
    assert uids == sorted(set(uids)), "strictly ascending"
    assert all(weight > 0.0 for _, weight in allocation.weights)
    assert abs(math.fsum(weight for _, weight in allocation.weights) - 1.0) <= 1e-12


@settings(max_examples=200, deadline=None)
@given(epochs(), POLICIES)
def test_the_vector_sums_to_one_is_positive_and_never_empty(
    epoch: tuple[list[ChallengeInput], dict[str, int], int], policy: Policy
) -> None:
    challenges, metagraph, burn_uid = epoch
    allocation = allocate(challenges, metagraph, burn_uid=burn_uid, policy=policy)
    _check_shape(allocation)
    for given_c, got in zip(challenges, allocation.challenges, strict=True):
        assert got.slug == given_c.slug
        if given_c.scores is None:
            assert got.outcome is Outcome.FAILED
        else:
            payable = any(
                score > 0 and metagraph.get(h, burn_uid) != burn_uid for h, score in given_c.scores
            )
            assert got.outcome is (Outcome.OK if payable else Outcome.EMPTY)


def _exact(
    challenges: list[ChallengeInput], metagraph: dict[str, int], burn_uid: int, policy: Policy
) -> dict[int, Fraction]:
    """The allocation in exact rational arithmetic, written straight from the formulas."""
    weights: dict[int, Fraction] = {}
    ok: list[tuple[ChallengeInput, dict[int, Fraction]]] = []
    lost = Fraction(0)
    for c in challenges:
        kept = [
            (metagraph[h], Fraction(score))
            for h, score in c.scores or []
            if h in metagraph and metagraph[h] != burn_uid and score > 0
        ]
        if not kept:
            lost += Fraction(c.share_ppb, PPB)
            continue
        total = sum(score for _, score in kept)
        normalized: dict[int, Fraction] = {}
        for uid, score in kept:
            normalized[uid] = normalized.get(uid, Fraction(0)) + score / total
        ok.append((c, normalized))
    ok_share = sum((Fraction(c.share_ppb, PPB) for c, _ in ok), Fraction(0))
    spread = policy is Policy.REDISTRIBUTE and ok_share > 0
    for c, normalized in ok:
        share = Fraction(c.share_ppb, PPB)
        applied = share + lost * share / ok_share if spread else share
        for uid, w in normalized.items():
            weights[uid] = weights.get(uid, Fraction(0)) + applied * w
    assigned = sum((Fraction(c.share_ppb, PPB) for c in challenges), Fraction(0))
    burn = 1 - assigned + (0 if spread else lost)
    weights[burn_uid] = weights.get(burn_uid, Fraction(0)) + burn
    return {uid: w for uid, w in weights.items() if w > 0}


@settings(max_examples=200, deadline=None)
@given(
    epochs(
        scores=st.sampled_from([0.0, 1.0, 3.0])
        | st.floats(1e-100, 1e100, allow_nan=False, allow_infinity=False)
    ),
    POLICIES,
)
def test_agrees_with_exact_rational_arithmetic(
    epoch: tuple[list[ChallengeInput], dict[str, int], int], policy: Policy
) -> None:
    challenges, metagraph, burn_uid = epoch
    allocation = allocate(challenges, metagraph, burn_uid=burn_uid, policy=policy)
    exact = _exact(challenges, metagraph, burn_uid, policy)
    assert [uid for uid, _ in allocation.weights] == sorted(exact)
    for uid, weight in allocation.weights:
        assert math.isclose(weight, exact[uid], rel_tol=1e-14), (uid, weight, float(exact[uid]))


@settings(max_examples=200, deadline=None)
@given(
    epochs(
        scores=st.sampled_from([0.0, 1.0])
        | st.floats(1e-100, 1e100, allow_nan=False, allow_infinity=False)
    ),
    POLICIES,
    st.data(),
)
def test_scaling_one_challenges_scores_changes_nothing(
    epoch: tuple[list[ChallengeInput], dict[str, int], int], policy: Policy, data: st.DataObject
) -> None:
    challenges, metagraph, burn_uid = epoch
    answered = [i for i, c in enumerate(challenges) if c.scores is not None]
    if not answered:
        return
    index = data.draw(st.sampled_from(answered))
    factor = data.draw(st.floats(1e-10, 1e10) | st.sampled_from([2.0, 3.0, 1e-3]))
    target = challenges[index]
    assert target.scores is not None
    scaled = [*challenges]
    scaled[index] = ChallengeInput(
        target.slug, target.share_ppb, [(h, s * factor) for h, s in target.scores]
    )
    before = allocate(challenges, metagraph, burn_uid=burn_uid, policy=policy)
    after = allocate(scaled, metagraph, burn_uid=burn_uid, policy=policy)
    assert [uid for uid, _ in after.weights] == [uid for uid, _ in before.weights]
    for (_, w_after), (_, w_before) in zip(after.weights, before.weights, strict=True):
        assert math.isclose(w_after, w_before, rel_tol=1e-12)
    assert [c.outcome for c in after.challenges] == [c.outcome for c in before.challenges]


@settings(max_examples=200, deadline=None)
@given(epochs())
def test_under_burn_no_challenge_pays_more_than_its_share(
    epoch: tuple[list[ChallengeInput], dict[str, int], int],
) -> None:
    challenges, metagraph, burn_uid = epoch
    full = allocate(challenges, metagraph, burn_uid=burn_uid, policy=Policy.BURN)
    paid_by_challenge = []
    for index, challenge in enumerate(challenges):
        # Under BURN a challenge's payout does not depend on the others: alone (the
        # others at share 0), it pays exactly what it pays in the full epoch.
        alone = [
            c if i == index else ChallengeInput(c.slug, 0, c.scores)
            for i, c in enumerate(challenges)
        ]
        allocation = allocate(alone, metagraph, burn_uid=burn_uid, policy=Policy.BURN)
        paid = math.fsum(w for uid, w in allocation.weights if uid != burn_uid)
        assert paid <= challenge.share_ppb / PPB + 1e-12
        assert full.challenges[index].share_applied == (
            challenge.share_ppb / PPB if full.challenges[index].outcome is Outcome.OK else 0.0
        )
        paid_by_challenge.append(paid)
    paid_total = math.fsum(w for uid, w in full.weights if uid != burn_uid)
    assert abs(paid_total - math.fsum(paid_by_challenge)) <= 1e-12


@settings(max_examples=200, deadline=None)
@given(epochs())
def test_under_redistribute_miners_get_at_most_the_assigned_shares(
    epoch: tuple[list[ChallengeInput], dict[str, int], int],
) -> None:
    challenges, metagraph, burn_uid = epoch
    allocation = allocate(challenges, metagraph, burn_uid=burn_uid, policy=Policy.REDISTRIBUTE)
    assigned = math.fsum(c.share_ppb for c in challenges) / PPB
    paid = math.fsum(w for uid, w in allocation.weights if uid != burn_uid)
    assert paid <= assigned + 1e-12
    assert allocation.burn_weight >= allocation.unallocated_share
    applied = math.fsum(c.share_applied for c in allocation.challenges)
    if any(c.outcome is Outcome.OK and c.share_assigned > 0 for c in allocation.challenges):
        assert abs(applied - assigned) <= 1e-12
        assert allocation.forfeited_share == 0.0
