"""The weight math: one epoch's challenge answers -> the subnet's float weight vector.

Pure: no I/O, no clock, no randomness (its one effect on the process is to defer the
garbage collector while it runs). The master runs it once when it seals an epoch; anyone
holding an epoch's inputs can run it again and must get the same vector.
docs/weights.md gives the formulas, the policies and a worked example.

Shares arrive as integer parts per billion (the registry stores them that way), so the
unallocated remainder, the forfeited shares and the burn weight are exact integer sums
rounded once to a float; the sums of floats use :func:`math.fsum`.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import math
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_not, mul, ne, truediv
from typing import cast

PPB = 1_000_000_000
"""Parts per billion in one whole share."""

MAX_UID = 65_535


class Policy(enum.Enum):
    """Where the share of a FAILED or EMPTY challenge goes."""

    BURN = "burn"
    """To the burn UID."""
    REDISTRIBUTE = "redistribute"
    """Over the OK challenges in proportion to their own shares (to the burn UID when no
    OK challenge has a positive share)."""


class Outcome(enum.Enum):
    """A challenge's outcome in one epoch."""

    OK = "ok"
    """At least one registered, non-burn hotkey scored > 0: its share is paid."""
    FAILED = "failed"
    """No usable answer (the caller records why): its share follows the policy."""
    EMPTY = "empty"
    """A valid answer with nothing payable in it: its share follows the policy."""


@dataclass(frozen=True)
class ChallengeInput:
    """One challenge's part of an epoch, as the allocation needs it."""

    slug: str
    share_ppb: int
    """Emission share in parts per billion, 0..1e9."""
    scores: Sequence[tuple[str, float]] | None
    """The validated raw answer as (hotkey, score) pairs; None when the challenge FAILED."""


@dataclass(frozen=True)
class ChallengeAllocation:
    """What one challenge got in the allocation."""

    slug: str
    outcome: Outcome
    share_assigned: float
    """share_ppb / 1e9."""
    share_applied: float
    """The share paid to the challenge's miners after the policy; 0 when FAILED or EMPTY."""
    paid_entry_count: int
    """Entries kept: hotkey registered, not the burn UID's, score > 0."""
    reason: str
    """Why the challenge is EMPTY; "" when OK or FAILED (the caller knows why it failed)."""


@dataclass(frozen=True)
class Allocation:
    """The epoch's float vector and how it was made."""

    weights: tuple[tuple[int, float], ...]
    """(uid, weight) with weight > 0, strictly ascending by uid, summing to 1 up to float
    rounding; never empty."""
    challenges: tuple[ChallengeAllocation, ...]
    """One per input challenge, in input order."""
    unallocated_share: float
    """1 minus the sum of the assigned shares: paid to the burn UID."""
    forfeited_share: float
    """Shares of FAILED and EMPTY challenges paid to the burn UID by the policy."""
    burn_weight: float
    """The burn UID's weight: unallocated_share + forfeited_share, rounded once."""


def allocate(
    challenges: Sequence[ChallengeInput],
    hotkey_to_uid: Mapping[str, int],
    *,
    burn_uid: int,
    policy: Policy,
) -> Allocation:
    """Allocate one epoch's weight over UIDs.

    ``hotkey_to_uid`` is the metagraph at the epoch's block. Per challenge, the hotkeys
    that are registered, not mapped to ``burn_uid`` and scored > 0 share the challenge's
    applied share in proportion to their scores; everything else (the unallocated
    remainder and the shares the policy burns) goes to ``burn_uid``.

    Raises ValueError, naming the offending field, when the inputs break their rules:
    a share that is not an integer in 0..1e9, shares summing over 1, a duplicate slug, a
    score that is not finite and >= 0, scores summing to infinity, a duplicate hotkey in
    one answer, a burn UID or a paid UID outside 0..65535.
    """
    _check_inputs(challenges, burn_uid)
    with _gc_paused():
        return _allocate(challenges, hotkey_to_uid, burn_uid, policy)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Defer the cyclic garbage collector. The allocation creates up to a few hundred
    thousand tuples and lists and no reference cycles; each batch of new objects would
    otherwise trigger collections that walk every object of the process (in the master,
    the answers themselves among them), which costs more than the allocation."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _allocate(
    challenges: Sequence[ChallengeInput],
    hotkey_to_uid: Mapping[str, int],
    burn_uid: int,
    policy: Policy,
) -> Allocation:
    # Pass 1: filter each answer and classify the challenge. The per-entry work runs
    # in C-level builtins (map, compress, fsum) where it can: answers have up to 65,536
    # entries and an epoch may have dozens of challenges.
    kept_by_challenge: list[tuple[list[int], list[float], float, int] | None] = []
    outcomes: list[Outcome] = []
    reasons: list[str] = []
    for index, challenge in enumerate(challenges):
        if challenge.scores is None:
            kept_by_challenge.append(None)
            outcomes.append(Outcome.FAILED)
            reasons.append("")
            continue
        hotkeys = [hotkey for hotkey, _ in challenge.scores]
        scores = [score for _, score in challenge.scores]
        _check_answer(index, hotkeys, scores)
        kept_uids, kept_scores, dropped = _registered(hotkeys, scores, hotkey_to_uid, burn_uid)
        paid_count = len(kept_scores) - kept_scores.count(0.0)
        if paid_count:
            # Finite: a subset of non-negative scores whose full sum is finite.
            total = math.fsum(kept_scores)
            kept_by_challenge.append((kept_uids, kept_scores, total, paid_count))
            outcomes.append(Outcome.OK)
            reasons.append("")
        else:
            kept_by_challenge.append(None)
            outcomes.append(Outcome.EMPTY)
            reasons.append(_empty_reason(len(scores), *dropped, len(kept_scores)))

    # Shares, exactly in ppb.
    assigned_ppb = sum(c.share_ppb for c in challenges)
    unallocated_ppb = PPB - assigned_ppb
    lost_ppb = sum(
        c.share_ppb for c, o in zip(challenges, outcomes, strict=True) if o is not Outcome.OK
    )
    ok_ppb = assigned_ppb - lost_ppb
    redistribute = policy is Policy.REDISTRIBUTE and ok_ppb > 0
    forfeited_ppb = 0 if redistribute else lost_ppb
    burn_ppb = unallocated_ppb + forfeited_ppb

    # Pass 2: each OK challenge's applied share over its kept hotkeys.
    paid_uids: list[int] = []
    paid_parts: list[float] = []
    allocations: list[ChallengeAllocation] = []
    for challenge, outcome, reason, kept in zip(
        challenges, outcomes, reasons, kept_by_challenge, strict=True
    ):
        applied = 0.0
        paid_count = 0
        if kept is not None:
            kept_uids, kept_scores, total, paid_count = kept
            if redistribute:
                # p_c + lost * p_c / ok = p_c * (ok + lost) / ok: one correctly rounded
                # division of exact integers.
                applied = challenge.share_ppb * (ok_ppb + lost_ppb) / (ok_ppb * PPB)
            else:
                applied = challenge.share_ppb / PPB
            if applied > 0.0:
                # a_c * (r / S) per entry, in C-level maps. Entries scored 0 stay: their
                # part is 0.0 and the vector leaves zero weights out.
                paid_uids += kept_uids
                paid_parts += map(mul, repeat(applied), map(truediv, kept_scores, repeat(total)))
        allocations.append(
            ChallengeAllocation(
                slug=challenge.slug,
                outcome=outcome,
                share_assigned=challenge.share_ppb / PPB,
                share_applied=applied,
                paid_entry_count=paid_count,
                reason=reason,
            )
        )

    burn_weight = burn_ppb / PPB
    weights = _vector(paid_uids, paid_parts, burn_uid, burn_weight)
    return Allocation(
        weights=weights,
        challenges=tuple(allocations),
        unallocated_share=unallocated_ppb / PPB,
        forfeited_share=forfeited_ppb / PPB,
        burn_weight=burn_weight,
    )


def _vector(
    uids: list[int], parts: list[float], burn_uid: int, burn_weight: float
) -> tuple[tuple[int, float], ...]:
    """(uid, weight) pairs, ascending by uid, weight > 0: every part summed per UID,
    plus the burn UID's weight."""
    if uids and not (min(uids) >= 0 and max(uids) <= MAX_UID):
        bad = next(uid for uid in uids if not 0 <= uid <= MAX_UID)
        raise ValueError(f"hotkey_to_uid: UID {bad} is outside 0..{MAX_UID}")
    # A dense array indexed by UID (at most 65,536 slots) orders the vector in linear
    # time, with C-level loops; sorting 65,536 pairs costs several times more.
    size = max(max(uids, default=0), burn_uid) + 1
    dense = [0.0] * size
    deque(map(dense.__setitem__, uids, parts), maxlen=0)
    # A UID paid twice shows as fewer non-zero slots than non-zero parts (a zero part
    # overwritten by a non-zero one does no harm): cheaper to count than to find.
    collided = size - dense.count(0.0) != len(parts) - parts.count(0.0)
    if collided and size <= 2 * len(uids):
        # Many UIDs paid by several challenges (miners entering every challenge): one
        # bucket per UID, filled and summed exactly with C-level loops.
        buckets: list[list[float]] = list(map(list, repeat((), size)))
        deque(map(list.append, map(buckets.__getitem__, uids), parts), maxlen=0)
        dense = list(map(math.fsum, buckets))
    elif collided:
        # A few UIDs paid by several challenges among many UIDs: sum just those exactly.
        dense = [0.0] * size
        shared: dict[int, list[float]] = {
            uid: [] for uid, count in Counter(uids).items() if count > 1
        }
        for uid, part in zip(uids, parts, strict=True):
            if uid in shared:
                shared[uid].append(part)
            else:
                dense[uid] = part
        for uid, uid_parts in shared.items():
            dense[uid] = math.fsum(uid_parts)
    # Hotkeys mapped to the burn UID were dropped, so nothing else lands there.
    dense[burn_uid] = burn_weight
    # Zero weights (UIDs scored 0, or whose part underflowed from a subnormal score) are
    # left out: compress keeps the pairs whose weight is true.
    return tuple(compress(enumerate(dense), dense))


def _check_inputs(challenges: Sequence[ChallengeInput], burn_uid: int) -> None:
    if not 0 <= burn_uid <= MAX_UID:
        raise ValueError(f"burn_uid: must be in 0..{MAX_UID}; got {burn_uid}")
    seen: dict[str, int] = {}
    for index, challenge in enumerate(challenges):
        share = challenge.share_ppb
        if not isinstance(share, int) or isinstance(share, bool) or not 0 <= share <= PPB:
            raise ValueError(
                f"challenges[{index}].share_ppb: must be an integer in 0..{PPB}; got {share!r}"
            )
        if challenge.slug in seen:
            raise ValueError(
                f"challenges[{index}].slug: {challenge.slug!r} duplicates "
                f"challenges[{seen[challenge.slug]}]"
            )
        seen[challenge.slug] = index
    total = sum(c.share_ppb for c in challenges)
    if total > PPB:
        raise ValueError(f"challenges: the shares sum to {total} ppb, over 1 ({PPB} ppb)")


def _check_answer(index: int, hotkeys: list[str], scores: list[float]) -> None:
    """Refuse an answer with a score that is not finite and >= 0, a sum that is not
    finite, or a duplicate hotkey; the message names the first offending entry."""
    try:
        # NaN or an infinity anywhere makes the sum non-finite.
        clean = math.isfinite(math.fsum(scores)) and (not scores or min(scores) >= 0.0)
    except (OverflowError, ValueError):  # finite scores overflowing; inf + -inf
        clean = False
    if not clean:
        for position, score in enumerate(scores):
            # Also false for NaN.
            if not 0.0 <= score < math.inf:
                raise ValueError(
                    f"challenges[{index}].scores[{position}]: score must be finite and >= 0; "
                    f"got {score!r}"
                )
        raise ValueError(f"challenges[{index}].scores: the scores sum to infinity")
    if len(set(hotkeys)) != len(hotkeys):
        first: dict[str, int] = {}
        for position, hotkey in enumerate(hotkeys):
            if hotkey in first:
                raise ValueError(
                    f"challenges[{index}].scores[{position}]: duplicate hotkey {hotkey!r} "
                    f"(also at scores[{first[hotkey]}])"
                )
            first[hotkey] = position


def _registered(
    hotkeys: list[str], scores: list[float], hotkey_to_uid: Mapping[str, int], burn_uid: int
) -> tuple[list[int], list[float], tuple[int, int]]:
    """The UIDs and scores of an answer's registered, non-burn entries, in answer order,
    and how many entries were dropped as (unregistered, mapped to the burn UID)."""
    # C-level scans and filters only (map, count, compress); a filter runs only when its
    # count found something to drop.
    found = list(map(hotkey_to_uid.get, hotkeys))
    unregistered = found.count(None)
    if unregistered:
        registered = list(map(is_not, found, repeat(None)))
        found = list(compress(found, registered))
        scores = list(compress(scores, registered))
    uids = cast(list[int], found)
    burned = uids.count(burn_uid)
    if burned:
        not_burn = list(map(ne, uids, repeat(burn_uid)))
        uids = list(compress(uids, not_burn))
        scores = list(compress(scores, not_burn))
    return uids, scores, (unregistered, burned)


def _empty_reason(entries: int, unregistered: int, burned: int, zero: int) -> str:
    """Why an answer pays nothing. Each entry counts under the first rule it fails:
    unregistered, mapped to the burn UID, scored 0."""
    if not entries:
        return "empty answer (0 entries)"
    parts = [
        f"{count} {label}"
        for count, label in (
            (unregistered, "unregistered"),
            (burned, "mapped to the burn UID"),
            (zero, "scored 0"),
        )
        if count
    ]
    counted = f"{entries} entry" if entries == 1 else f"{entries} entries"
    return f"no registered, non-burn hotkey scored > 0 ({counted}: {', '.join(parts)})"
