"""plan_weights against the Bittensor SDK's own weight conversion, called directly."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pytest
from bittensor.intents.weights import clip_to_max_weight, normalize
from hypothesis import example, given, settings
from hypothesis import strategies as st

from platform_common.chain import ChainWeights, Hyperparameters, SdkChain, plan_chain_weights
from platform_common.chain.conversion import within_max_weight_limit

U16_MAX = 65535


def hyper(max_weight_limit: int = U16_MAX, min_allowed_weights: int = 1) -> Hyperparameters:
    return Hyperparameters(
        netuid=7,
        block=100,
        tempo=360,
        weights_rate_limit=100,
        max_weight_limit=max_weight_limit,
        min_allowed_weights=min_allowed_weights,
        commit_reveal_enabled=False,
        weights_version=3,
    )


def sdk_conversion(
    weights: Mapping[int, float], max_weight_limit: int
) -> tuple[list[int], list[int]]:
    """What SetWeights does to float weights, through the SDK's public functions."""
    uids = sorted(weights)
    floats = [float(weights[uid]) for uid in uids]
    if max_weight_limit < U16_MAX:
        floats = clip_to_max_weight(floats, max_weight_limit / U16_MAX)
    return normalize(uids, floats)


@pytest.mark.parametrize(
    ("weights", "limit"),
    [
        ({0: 0.5, 1: 0.3, 2: 0.2}, U16_MAX),
        ({4: 1.0}, U16_MAX),
        ({0: 8.0, 1: 4.0, 2: 2.0, 3: 1.0, 4: 1.0}, 26214),  # clipped to 0.4
        ({0: 0.9, 1: 0.05, 2: 0.03, 3: 0.02}, 40000),  # clipped to 0.61
    ],
)
def test_plan_is_the_sdk_conversion(weights: dict[int, float], limit: int) -> None:
    planned = plan_chain_weights(weights, hyper(limit))
    uids, values = sdk_conversion(weights, limit)
    assert (list(planned.uids), list(planned.values)) == (uids, values)
    assert max(planned.values) == U16_MAX
    assert planned.max_weight_limit == limit
    assert planned.version_key == 3  # the subnet's weights_version


def test_the_clip_caps_the_largest_share() -> None:
    planned = plan_chain_weights({0: 8.0, 1: 4.0, 2: 2.0, 3: 1.0, 4: 1.0}, hyper(26214))
    unclipped = plan_chain_weights({0: 8.0, 1: 4.0, 2: 2.0, 3: 1.0, 4: 1.0}, hyper())
    assert planned.values != unclipped.values
    assert max(planned.values) / sum(planned.values) <= 26214 / U16_MAX
    assert max(unclipped.values) / sum(unclipped.values) > 26214 / U16_MAX


def test_zero_weights_are_dropped_and_uids_ascend() -> None:
    planned = plan_chain_weights({5: 0.25, 0: 0.0, 3: 1.0, 9: 0.0}, hyper())
    assert planned == ChainWeights(
        uids=(3, 5), values=(65535, 16384), max_weight_limit=U16_MAX,
        min_allowed_weights=1, version_key=3,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("weights", "limit", "sdk_values", "planned_values"),
    [
        # The SDK's rounding leaves the largest share a hair above the limit, which the
        # pallet's exact check refuses; one unit more on the largest value below the cap
        # brings it within.
        ({2: 0.5, 3: 0.25, 5: 0.25}, 30000, [65535, 38813, 38813], (65535, 38814, 38813)),
        (
            {1: 10.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0},
            32768,
            [65535, 16383, 16383, 16383, 16383],
            (65535, 16384, 16384, 16383, 16383),
        ),
    ],
)
def test_a_rounded_clip_is_fitted_under_the_chains_exact_limit(
    weights: dict[int, float], limit: int, sdk_values: list[int], planned_values: tuple[int, ...]
) -> None:
    uids, values = sdk_conversion(weights, limit)
    assert values == sdk_values
    assert not within_max_weight_limit(values, limit)  # the chain would refuse the SDK's vector
    planned = plan_chain_weights(weights, hyper(limit))
    assert planned.uids == tuple(uids)
    assert planned.values == planned_values
    assert within_max_weight_limit(planned.values, limit)
    # SetWeights converts the planned vector again and submits exactly it.
    assert sdk_conversion(planned.as_mapping(), limit) == (list(planned.uids), list(planned_values))


def test_fewer_weights_than_min_allowed_is_refused_as_the_sdk_refuses() -> None:
    with pytest.raises(ValueError, match=r"requires at least 3 weights; only 2 are nonzero"):
        plan_chain_weights({0: 1.0, 1: 0.5, 2: 0.0}, hyper(min_allowed_weights=3))


def test_a_limit_no_vector_can_meet_is_refused() -> None:
    # Three uids can never keep each share under 10000/65535 (about 15%).
    with pytest.raises(ValueError, match=r"cannot respect max_weight_limit 10000"):
        plan_chain_weights({0: 1.0, 1: 1.0, 2: 1.0}, hyper(10000))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({0: -1.0}, r"uid 0 has weight -1.0; must be finite and >= 0"),
        ({1: math.nan}, r"uid 1 has weight nan"),
        ({2: math.inf}, r"uid 2 has weight inf"),
        ({70000: 1.0}, r"uid 70000 is not an integer in 0..65535"),
        ({0: 0.0, 1: 0.0}, r"All weights are zero"),
        ({}, r"All weights are zero"),
    ],
)
def test_bad_weights_are_refused_naming_the_problem(
    weights: dict[int, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_chain_weights(weights, hyper())


def test_chain_weights_refuse_a_vector_not_in_u16_form() -> None:
    with pytest.raises(ValueError, match="largest value must be 65535"):
        ChainWeights((1, 2), (100, 200), U16_MAX, 1, 0)
    with pytest.raises(ValueError, match="strictly ascending"):
        ChainWeights((2, 1), (65535, 200), U16_MAX, 1, 0)
    with pytest.raises(ValueError, match=r"1\.\.65535 \(zeros are dropped\)"):
        ChainWeights((1, 2), (65535, 0), U16_MAX, 1, 0)


async def test_the_chain_plans_with_the_same_conversion(chain: SdkChain) -> None:
    hyperparameters = await chain.hyperparameters()
    weights = {3: 0.7, 4: 0.2, 6: 0.1}
    assert chain.plan_weights(weights, hyperparameters) == plan_chain_weights(
        weights, hyperparameters
    )
    elsewhere = dataclasses.replace(hyperparameters, netuid=8)
    with pytest.raises(ValueError, match="read for netuid 8, this chain is netuid 7"):
        chain.plan_weights(weights, elsewhere)


weight_maps = st.dictionaries(
    st.integers(min_value=0, max_value=300),
    st.one_of(
        st.just(0.0),
        st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=60,
)
limits = st.one_of(st.just(U16_MAX), st.integers(min_value=1, max_value=U16_MAX - 1))


@settings(max_examples=300, deadline=None)
@given(weights=weight_maps, limit=limits)
@example(weights={0: 1.0, 1: 0.5, 2: 716580.0, 3: 0.0}, limit=20849)
def test_plans_are_what_set_weights_submits_and_what_the_chain_accepts(
    weights: dict[int, float], limit: int
) -> None:
    positive = sum(1 for w in weights.values() if w > 0)
    if positive == 0:
        with pytest.raises(ValueError, match="All weights are zero"):
            plan_chain_weights(weights, hyper(limit))
        return
    # No share can be kept under the limit: too few uids given, or too few left non-zero
    # by the SDK's own conversion (it drops values that round to zero).
    if len(weights) * limit < U16_MAX or len(sdk_conversion(weights, limit)[0]) * limit < U16_MAX:
        with pytest.raises(ValueError, match="cannot respect max_weight_limit"):
            plan_chain_weights(weights, hyper(limit))
        return
    planned = plan_chain_weights(weights, hyper(limit))
    # Zero weights take part in the SDK's clip (it spreads the excess over every uid
    # given), so only an unclipped plan is limited to the positive weights (weights
    # below 1/65535 of the largest round to zero and are dropped).
    assert set(planned.uids) <= set(weights)
    if limit == U16_MAX:
        assert set(planned.uids) <= {uid for uid, w in weights.items() if w > 0}
    assert all(1 <= v <= U16_MAX for v in planned.values)
    assert max(planned.values) == U16_MAX
    assert within_max_weight_limit(planned.values, limit)
    # A fixed point of the SDK's conversion: SetWeights submits the plan unchanged.
    assert sdk_conversion(planned.as_mapping(), limit) == (
        list(planned.uids),
        list(planned.values),
    )
    # And, share by share, within rounding of what the SDK makes of the floats directly.
    uids, values = sdk_conversion(weights, limit)
    assert list(planned.uids) == uids
    planned_total, sdk_total = sum(planned.values), sum(values)
    for ours, theirs in zip(planned.values, values, strict=True):
        assert abs(ours / planned_total - theirs / sdk_total) <= 1e-4
