"""Float weights -> the u16 vector the Bittensor SDK submits. Pure: no I/O.

The conversion is the SDK's own (``bittensor.intents.weights``: the max-weight clip,
the max-upscale to 65535 with rounding and zeros dropped, the minimum-weight-count
check), run for the given hyperparameters, so every validator submitting the result
submits the identical vector. Two details make "the identical vector" exact:

- After a clip, the rounded vector can exceed the subnet's max weight limit by a hair
  (the SDK rounds, the pallet's ``check_vec_max_limited`` is exact), and the chain would
  refuse it with ``MaxWeightExceeded``. The plan then adds one unit to as few values
  below the cap as needed (the largest first), a change of the order of the rounding
  the conversion already does, so the chain accepts the vector.
- ``SetWeights`` converts again whatever it is given, and a vector over the limit would
  be clipped again. The plan is checked to be a fixed point of the conversion (and
  converted again until it is), so what the SDK submits is exactly the plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bittensor import BittensorError
from bittensor.intents.weights import _conform, _Preflight

from platform_common.chain.interface import U16_MAX, ChainWeights, Hyperparameters

# The SDK's self-weight exemption needs the submitter's uid; a planned vector is
# submitted by every validator, so no uid is exempt.
_NO_SUBMITTER_UID = -1
_MAX_PASSES = 8
_FRACTION_BITS = 32  # the pallet compares I32F32 fixed-point fractions


def within_max_weight_limit(values: Sequence[int], max_weight_limit: int) -> bool:
    """The pallet's check: the largest value's share of the sum is at most limit / 65535.

    Computed as the chain computes it, in I32F32 fixed point with truncating division.
    """
    total = sum(values)
    if max_weight_limit >= U16_MAX or not values or total == 0:
        return True
    largest_share = (max(values) << _FRACTION_BITS) // total
    limit_share = (max_weight_limit << _FRACTION_BITS) // U16_MAX
    return largest_share <= limit_share


def plan_chain_weights(
    weights: Mapping[int, float], hyperparameters: Hyperparameters
) -> ChainWeights:
    """The u16 form of ``weights`` for ``hyperparameters``, as the SDK would submit it.

    Raises ValueError (naming the problem) for a uid outside 0..65535, a weight that is
    negative or not finite, an all-zero vector, fewer non-zero weights than the subnet's
    ``min_allowed_weights``, or too few uids for any vector to respect its max weight
    limit (the SDK and the chain would refuse each of these).
    """
    for uid, weight in weights.items():
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= U16_MAX:
            raise ValueError(f"weights: uid {uid!r} is not an integer in 0..65535")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights: uid {uid} has weight {weight!r}; must be finite and >= 0")
    limit = hyperparameters.max_weight_limit
    if not 0 <= limit <= U16_MAX:
        raise ValueError(f"max_weight_limit: {limit} is not a u16 value")
    preflight = _Preflight(
        uid=_NO_SUBMITTER_UID,
        commit_reveal=hyperparameters.commit_reveal_enabled,
        min_allowed_weights=hyperparameters.min_allowed_weights,
        max_weight_limit=limit,
    )
    netuid = hyperparameters.netuid
    ordered = sorted(weights)
    uids, values = _convert(ordered, [float(weights[u]) for u in ordered], preflight, netuid)
    for _ in range(_MAX_PASSES):
        if not within_max_weight_limit(values, limit):
            values = _fit(uids, values, limit)
        again = _convert(uids, [float(v) for v in values], preflight, netuid)
        if again == (uids, values):
            break
        uids, values = again
    else:  # pragma: no cover - settles after one extra pass at most
        raise ValueError("weights: the SDK's conversion did not settle on one vector")
    return ChainWeights(
        uids=tuple(uids),
        values=tuple(values),
        max_weight_limit=limit,
        min_allowed_weights=hyperparameters.min_allowed_weights,
        version_key=hyperparameters.weights_version,
    )


def _convert(
    uids: list[int], values: list[float], preflight: _Preflight, netuid: int
) -> tuple[list[int], list[int]]:
    """One pass of the SDK's conversion, as SetWeights runs it."""
    try:
        return _conform(uids, values, preflight, netuid)
    except BittensorError as exc:
        raise ValueError(f"weights: {exc}") from exc


def _fit(uids: list[int], values: list[int], limit: int) -> list[int]:
    """Add one unit at a time to the largest values below the cap until the chain's check passes."""
    fitted = list(values)
    below_cap = sorted(
        (i for i, v in enumerate(fitted) if v < U16_MAX - 1), key=lambda i: (-fitted[i], uids[i])
    )
    if not below_cap:
        raise ValueError(
            f"weights: {len(fitted)} non-zero weights cannot respect max_weight_limit {limit}: "
            f"the largest share would exceed {limit}/65535 for any vector over these uids"
        )
    step = 0
    while not within_max_weight_limit(fitted, limit):
        index = below_cap[step % len(below_cap)]
        if fitted[index] >= U16_MAX - 1:
            raise ValueError(  # pragma: no cover - the deficit is a few units
                f"weights: cannot fit the vector under max_weight_limit {limit}"
            )
        fitted[index] += 1
        step += 1
    return fitted
