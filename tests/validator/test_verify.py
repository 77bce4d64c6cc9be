"""What the validator refuses to submit: pure checks over vectors signed by the real code."""

from __future__ import annotations

import dataclasses

import pytest

from platform_common.chain import Hyperparameters, plan_chain_weights
from tests.validator.support import NS, OTHER_KEY, make_vector, master_hotkey, signer
from validator.verify import (
    REJECTED_INVALID,
    SKIPPED_STALE,
    Expectations,
    Position,
    check_chain_form,
    check_vector,
    is_newer,
)

NOW = 1_800_000_000 * NS


def expect(**overrides: object) -> Expectations:
    base = Expectations(master_hotkey=master_hotkey(), netuid=1, mechanism_id=0, clock_skew=30.0)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def hyper(**overrides: object) -> Hyperparameters:
    base = Hyperparameters(
        netuid=1,
        block=50,
        tempo=360,
        weights_rate_limit=100,
        max_weight_limit=65535,
        min_allowed_weights=1,
        commit_reveal_enabled=False,
        weights_version=0,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def test_a_fresh_vector_signed_by_the_configured_master_passes() -> None:
    vector = make_vector(3, created_ns=NOW - 10 * NS)
    assert check_vector(vector, expect(), None, NOW) is None
    last = Position(vector.history_id, 2, NOW - 100 * NS)
    assert check_vector(vector, expect(), last, NOW) is None


def test_a_bad_signature_is_refused_and_nothing_in_the_vector_is_trusted() -> None:
    vector = make_vector(created_ns=NOW)
    broken = bytearray(vector.signature)
    broken[10] ^= 0x01
    vector.signature = bytes(broken)
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert (refusal.check, refusal.outcome, refusal.authentic) == (
        "signature",
        REJECTED_INVALID,
        False,
    )
    assert master_hotkey() in refusal.message


def test_a_field_changed_after_signing_breaks_the_signature() -> None:
    vector = make_vector(created_ns=NOW)
    vector.chain_weights.values[0] = 65534
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert refusal.check == "signature"


def test_a_vector_signed_by_another_key_is_refused() -> None:
    impostor = make_vector(created_ns=NOW, key=OTHER_KEY)
    refusal = check_vector(impostor, expect(), None, NOW)
    assert refusal is not None
    assert (refusal.check, refusal.outcome, refusal.authentic) == (
        "master_hotkey",
        REJECTED_INVALID,
        False,
    )
    # Claiming the master's address does not help: the signature is checked against it.
    impostor.master_hotkey = master_hotkey()
    refusal = check_vector(impostor, expect(), None, NOW)
    assert refusal is not None
    assert refusal.check == "signature"


def test_an_unknown_encoding_version_is_refused() -> None:
    vector = make_vector(created_ns=NOW)
    vector.encoding_version = 2
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert refusal.check == "encoding_version"


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [("netuid", 2, "netuid"), ("mechanism_id", 1, "mechanism_id")],
)
def test_a_vector_for_another_subnet_or_mechanism_is_refused(
    field: str, value: int, check: str
) -> None:
    vector = make_vector(created_ns=NOW, **{field: value})  # type: ignore[arg-type]
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert (refusal.check, refusal.outcome, refusal.authentic) == (check, REJECTED_INVALID, True)
    assert f"for {value}, not 0" in refusal.message or f"for {value}, not 1" in refusal.message


def test_an_old_or_repeated_epoch_is_skipped_and_a_newer_one_passes() -> None:
    last = Position("history-a", 5, NOW - 60 * NS)
    for epoch in (4, 5):
        refusal = check_vector(make_vector(epoch, created_ns=NOW), expect(), last, NOW)
        assert refusal is not None
        assert (refusal.check, refusal.outcome) == ("not_newer", SKIPPED_STALE)
        assert "epoch 5" in refusal.message
    assert check_vector(make_vector(6, created_ns=NOW), expect(), last, NOW) is None


def test_across_histories_the_create_time_orders_vectors() -> None:
    last = Position("history-a", 40, NOW - 60 * NS)
    # Epoch numbers restart in a new history: epoch 1 there is newer if created later.
    later = make_vector(1, history_id="history-b", created_ns=NOW - 30 * NS)
    assert check_vector(later, expect(), last, NOW) is None
    earlier = make_vector(99, history_id="history-b", created_ns=NOW - 90 * NS)
    refusal = check_vector(earlier, expect(), last, NOW)
    assert refusal is not None
    assert refusal.check == "not_newer"


def test_an_expired_vector_is_skipped_up_to_the_last_nanosecond() -> None:
    vector = make_vector(created_ns=NOW - 100 * NS, lifetime=100)
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert (refusal.check, refusal.outcome, refusal.authentic) == ("expired", SKIPPED_STALE, True)
    assert check_vector(vector, expect(), None, NOW - 1) is None


def test_a_vector_from_the_future_is_refused_beyond_the_clock_skew() -> None:
    vector = make_vector(created_ns=NOW + 31 * NS)
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert refusal.check == "create_time"
    assert refusal.outcome == REJECTED_INVALID
    assert check_vector(vector, expect(clock_skew=60.0), None, NOW) is None


def test_a_malformed_chain_form_is_refused_even_when_signed() -> None:
    vector = make_vector(created_ns=NOW, chain_form=((0, 1), (30000, 30000)))
    refusal = check_vector(vector, expect(), None, NOW)
    assert refusal is not None
    assert refusal.check == "shape"
    assert "65535" in refusal.message


def test_position_order() -> None:
    a = Position("h", 3, 100)
    assert is_newer(a, None)
    assert is_newer(Position("h", 4, 50), a)
    assert not is_newer(Position("h", 3, 200), a)
    assert is_newer(Position("g", 1, 101), a)
    assert not is_newer(Position("g", 9, 100), a)


def test_the_chain_form_must_be_what_the_sdk_plans_now() -> None:
    weights = ((0, 0.5), (3, 0.25), (5, 0.25))
    vector = make_vector(weights=weights, created_ns=NOW)
    now = hyper()
    planned = plan_chain_weights(dict(weights), now)
    assert check_chain_form(vector, now, planned) is None

    # The subnet owner lowered the max weight: the SDK would submit another vector.
    clipped = hyper(max_weight_limit=30000)
    refusal = check_chain_form(vector, clipped, plan_chain_weights(dict(weights), clipped))
    assert refusal is not None
    assert (refusal.check, refusal.outcome) == ("chain_weights", REJECTED_INVALID)
    assert "values" in refusal.message
    assert "max_weight_limit" in refusal.message

    refusal = check_chain_form(vector, now, ValueError("fewer than 8 non-zero weights"))
    assert refusal is not None
    assert "fewer than 8" in refusal.message

    bumped = hyper(weights_version=7)
    refusal = check_chain_form(vector, bumped, plan_chain_weights(dict(weights), bumped))
    assert refusal is not None
    assert refusal.check == "version_key"
    assert "7" in refusal.message


def test_verification_uses_the_configured_key_not_the_vector_field() -> None:
    vector = make_vector(created_ns=NOW, key=OTHER_KEY)
    assert vector.master_hotkey == signer(OTHER_KEY).ss58_address
    accepted = check_vector(vector, expect(master_hotkey=vector.master_hotkey), None, NOW)
    assert accepted is None
