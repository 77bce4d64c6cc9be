"""The weights validation rules, each with its exact message, subject and order."""

from __future__ import annotations

import json
import math

import pytest
from bittensor.sp_core import Keypair

from platform_common.answers import (
    Limits,
    Rule,
    WeightsRefused,
    check_size,
    parse_http_answer,
    read_grpc_answer,
    request_violations,
    validate_response,
)
from platform_network.v1 import challenge_pb2

ALICE = Keypair.create_from_uri("//Alice").ss58_address
BOB = Keypair.create_from_uri("//Bob").ss58_address
CHARLIE = Keypair.create_from_uri("//Charlie").ss58_address
BAD_CHECKSUM = ALICE[:-1] + "Z"
LIMITS = Limits()


def answer(*entries: tuple[str, float], label: str = "") -> challenge_pb2.GetWeightsResponse:
    return challenge_pb2.GetWeightsResponse(
        entries=[challenge_pb2.WeightEntry(hotkey=h, score=s) for h, s in entries],
        scoring_version=label,
    )


def refusal(response: challenge_pb2.GetWeightsResponse, limits: Limits = LIMITS) -> WeightsRefused:
    with pytest.raises(WeightsRefused) as info:
        validate_response(response, limits)
    return info.value


def http_refusal(body: bytes | str, limits: Limits = LIMITS) -> WeightsRefused:
    with pytest.raises(WeightsRefused) as info:
        parse_http_answer(body.encode() if isinstance(body, str) else body, limits)
    return info.value


def weights_body(members: str) -> str:
    """An HTTP weights body around JSON object members written out by hand."""
    return '{"weights": {' + members + "}}"


def test_a_valid_answer_passes_unchanged() -> None:
    response = answer((ALICE, 3.0), (BOB, 0.0), label="v3")
    assert validate_response(response, LIMITS).response is response


def test_an_empty_answer_is_valid() -> None:
    assert len(validate_response(answer(), LIMITS).response.entries) == 0


# --- rule 1: size ------------------------------------------------------------------


def test_too_many_entries() -> None:
    refused = refusal(answer(*[(ALICE, 1.0)] * 5), Limits(max_entries=4))
    assert refused.code == "RESOURCE_EXHAUSTED"
    assert refused.rule is Rule.SIZE
    assert refused.violation_type is None
    assert refused.message == "entries: at most 4 allowed; got 5"


def test_exactly_max_entries_passes() -> None:
    hotkeys = [Keypair.create_from_uri(f"//k{i}").ss58_address for i in range(4)]
    validate_response(answer(*[(h, 1.0) for h in hotkeys]), Limits(max_entries=4))


def test_too_many_bytes_is_checked_before_parsing() -> None:
    raw = answer((ALICE, 1.0)).SerializeToString()
    with pytest.raises(WeightsRefused) as info:
        read_grpc_answer(raw, Limits(max_response_bytes=len(raw) - 1))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert info.value.message == f"response: at most {len(raw) - 1} bytes allowed; got {len(raw)}"
    # Exactly at the limit passes.
    assert read_grpc_answer(raw, Limits(max_response_bytes=len(raw))).hotkeys[0] == ALICE


def test_byte_rule_fires_before_entry_rule() -> None:
    raw = answer(*[(ALICE, 1.0)] * 10).SerializeToString()
    with pytest.raises(WeightsRefused) as info:
        read_grpc_answer(raw, Limits(max_entries=2, max_response_bytes=100))
    assert info.value.message == f"response: at most 100 bytes allowed; got {len(raw)}"


def test_cut_off_body_has_no_exact_size() -> None:
    with pytest.raises(WeightsRefused) as info:
        check_size(None, Limits(max_response_bytes=10))
    assert info.value.message == "response: at most 10 bytes allowed; got more"


def test_garbage_protobuf_is_malformed() -> None:
    with pytest.raises(WeightsRefused) as info:
        read_grpc_answer(b"\x0a\xff\xff", LIMITS)
    assert info.value.code == "FAILED_PRECONDITION"
    assert info.value.violation_type == "WEIGHTS_MALFORMED"
    assert info.value.violations[0].subject == "response"
    assert info.value.message.startswith("response: not a valid GetWeightsResponse encoding")


# --- rule 3: hotkeys ---------------------------------------------------------------


def test_invalid_hotkey_names_the_entry_and_reason() -> None:
    refused = refusal(answer((ALICE, 1.0), (BAD_CHECKSUM, 1.0)))
    assert refused.code == "FAILED_PRECONDITION"
    assert refused.violation_type == "WEIGHTS_INVALID_HOTKEY"
    assert refused.message == (
        f'entries[1].hotkey: not a valid SS58 address (bad checksum); got "{BAD_CHECKSUM}"'
    )
    (violation,) = refused.violations
    assert violation.subject == "entries[1].hotkey"
    assert violation.description == (
        f'not a valid SS58 address (bad checksum); got "{BAD_CHECKSUM}"'
    )


def test_long_hotkeys_are_cut_in_messages() -> None:
    refused = refusal(answer(("x" * 100, 1.0)))
    assert refused.message == (
        'entries[0].hotkey: not a valid SS58 address (wrong length); got "' + "x" * 64 + '..."'
    )


def test_at_most_16_violations_are_listed_and_the_rest_counted() -> None:
    refused = refusal(answer(*[(f"bad{i}", 1.0) for i in range(20)]))
    assert len(refused.violations) == 16
    assert refused.total == 20
    assert [v.subject for v in refused.violations] == [f"entries[{i}].hotkey" for i in range(16)]
    assert refused.message == (
        'entries[0].hotkey: not a valid SS58 address (not base58); got "bad0"; and 19 more'
    )


# --- rule 4: duplicates ------------------------------------------------------------


def test_duplicate_names_both_indices() -> None:
    refused = refusal(answer((ALICE, 1.0), (BOB, 2.0), (ALICE, 3.0)))
    assert refused.violation_type == "WEIGHTS_DUPLICATE_HOTKEY"
    assert refused.message == f'entries[2].hotkey: duplicate of entries[0].hotkey; got "{ALICE}"'


def test_hotkey_rule_comes_before_duplicates() -> None:
    refused = refusal(answer((ALICE, 1.0), (ALICE, 1.0), ("nope", 1.0)))
    assert refused.rule is Rule.HOTKEY


# --- rule 5: scores ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "shown"),
    [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "-inf"), (-1.0, "-1.0"), (-0.5, "-0.5")],
)
def test_bad_score(score: float, shown: str) -> None:
    refused = refusal(answer((ALICE, 1.0), (BOB, score), (CHARLIE, 0.0)))
    assert refused.violation_type == "WEIGHTS_INVALID_SCORE"
    assert refused.message == f"entries[1].score: must be finite and >= 0; got {shown}"


def test_zero_and_negative_zero_are_allowed() -> None:
    validate_response(answer((ALICE, 0.0), (BOB, -0.0)), LIMITS)


def test_sum_must_be_finite() -> None:
    refused = refusal(answer((ALICE, 1e308), (BOB, 1e308)))
    assert refused.violation_type == "WEIGHTS_INVALID_SCORE"
    assert refused.message == "entries: sum of scores must be finite; got inf"


def test_duplicate_rule_comes_before_scores() -> None:
    refused = refusal(answer((ALICE, math.nan), (ALICE, 1.0)))
    assert refused.rule is Rule.DUPLICATE


# --- rule 6: label -----------------------------------------------------------------


def test_label_too_long() -> None:
    refused = refusal(answer((ALICE, 1.0), label="v" * 129))
    assert refused.violation_type == "WEIGHTS_INVALID_LABEL"
    assert refused.message == "scoring_version: at most 128 characters; got 129"
    validate_response(answer((ALICE, 1.0), label="v" * 128), LIMITS)


def test_label_must_be_printable_ascii() -> None:
    refused = refusal(answer((ALICE, 1.0), label="v1\n"))
    assert refused.message == 'scoring_version: must be printable ASCII; got "v1\\n"'
    refused = refusal(answer((ALICE, 1.0), label="v\u00e9"))
    assert refused.message == 'scoring_version: must be printable ASCII; got "v\\u00e9"'


def test_score_rule_comes_before_label() -> None:
    assert refusal(answer((ALICE, -1.0), label="\x00")).rule is Rule.SCORE


# --- HTTP bodies -------------------------------------------------------------------


def test_http_body_translates_in_document_order() -> None:
    body = json.dumps({"weights": {BOB: 2, ALICE: 0.5}, "scoring_version": "v2", "epoch": 7})
    response = parse_http_answer(body.encode(), LIMITS)
    assert [(e.hotkey, e.score) for e in response.entries] == [(BOB, 2.0), (ALICE, 0.5)]
    assert response.scoring_version == "v2"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "body: must be a JSON document (Expecting value: line 1 column 1 (char 0))"),
        ("[1]", "body: must be a JSON object; got array"),
        ("{}", 'weights: required: the body has no "weights" member'),
        ('{"weights": [1]}', "weights: must be a JSON object; got array"),
        ('{"weights": {}, "weights": {}}', "weights: appears twice in the body"),
        (
            '{"weights": {}, "scoring_version": 3}',
            "scoring_version: must be a JSON string; got number",
        ),
        (
            weights_body(f'"{ALICE}": "1"'),
            'entries[0].score: must be a JSON number; got string "1"',
        ),
        (weights_body(f'"{ALICE}": true'), "entries[0].score: must be a JSON number; got true"),
        (weights_body(f'"{ALICE}": null'), "entries[0].score: must be a JSON number; got null"),
    ],
)
def test_http_shape(body: str, message: str) -> None:
    refused = http_refusal(body)
    assert refused.code == "FAILED_PRECONDITION"
    assert refused.violation_type == "WEIGHTS_MALFORMED"
    assert refused.message == message


def test_http_body_must_be_utf8() -> None:
    refused = http_refusal(b'{"weights": {"\xff": 1}}')
    assert refused.violation_type == "WEIGHTS_MALFORMED"
    assert refused.message == "body: must be UTF-8 JSON (invalid start byte)"


@pytest.mark.parametrize(
    ("literal", "shown"),
    [("NaN", "NaN"), ("Infinity", "inf"), ("-Infinity", "-inf"), ("1e999", "inf")],
)
def test_http_non_finite_literals_are_invalid_scores(literal: str, shown: str) -> None:
    refused = http_refusal(weights_body(f'"{ALICE}": 1, "{BOB}": {literal}'))
    assert refused.violation_type == "WEIGHTS_INVALID_SCORE"
    assert refused.message == f"entries[1].score: must be finite and >= 0; got {shown}"


def test_http_huge_integer_is_an_invalid_score() -> None:
    refused = http_refusal(weights_body(f'"{ALICE}": {"9" * 400}'))
    assert refused.message == "entries[0].score: must be finite and >= 0; got inf"


def test_http_duplicate_json_keys_are_detected() -> None:
    refused = http_refusal(weights_body(f'"{ALICE}": 1, "{BOB}": 2, "{ALICE}": 3'))
    assert refused.violation_type == "WEIGHTS_DUPLICATE_HOTKEY"
    assert refused.message == f'entries[2].hotkey: duplicate of entries[0].hotkey; got "{ALICE}"'


def test_http_entry_count_comes_before_value_shapes() -> None:
    body = '{"weights": {"a": "x", "b": "y", "c": "z"}}'
    refused = http_refusal(body, Limits(max_entries=2))
    assert refused.message == "entries: at most 2 allowed; got 3"


def test_http_body_size() -> None:
    body = json.dumps({"weights": {ALICE: 1}}).encode()
    refused = http_refusal(body, Limits(max_response_bytes=10))
    assert refused.message == f"response: at most 10 bytes allowed; got {len(body)}"


def test_http_deep_nesting_is_malformed_not_a_crash() -> None:
    refused = http_refusal('{"weights": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert refused.violation_type == "WEIGHTS_MALFORMED"
    assert refused.message.startswith("body: must be a JSON document")


# --- the request -------------------------------------------------------------------


def test_request_rules() -> None:
    assert request_violations(challenge_pb2.GetWeightsRequest(epoch=1, epoch_id="e")) == []
    found = request_violations(challenge_pb2.GetWeightsRequest(epoch=0))
    assert [str(v) for v in found] == ["epoch: must be >= 1; got 0", "epoch_id: must not be empty"]
    found = request_violations(challenge_pb2.GetWeightsRequest(epoch=-3, epoch_id="e" * 65))
    assert [str(v) for v in found] == [
        "epoch: must be >= 1; got -3",
        "epoch_id: at most 64 characters; got 65",
    ]
