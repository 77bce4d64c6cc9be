"""Canonical encodings, digests and the vector signature.

golden_encodings_v1.txt holds the expected bytes of each encoding for the inputs built
here, field by field. They are frozen: there is deliberately no flag to regenerate them,
since changed bytes break every signature and digest already made (that needs a new
encoding_version).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bittensor import sp_core
from bittensor.intents.weights import normalize
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from platform_common.keys import Signer, load_signer, verify_signature
from platform_common.vectors import (
    CHECK_ENCODING,
    CHECK_ENCODING_VERSION,
    CHECK_MASTER_HOTKEY,
    CHECK_SIGNATURE,
    ENCODING_VERSION,
    EncodingError,
    VectorRejected,
    inputs_digest,
    raw_answer_digest,
    sign_vector,
    vector_signing_bytes,
    verify_vector,
)
from platform_common.weights import allocate
from platform_network.v1 import weights_pb2
from tests.weights.golden import case_named

GOLDEN_FILE = Path(__file__).with_name("golden_encodings_v1.txt")

ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
BOB = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
CHARLIE = "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y"
DAVE = "5DAAnrj7VHTznn2AWBemMuyBwZWs6FNFjdyVXUeYum3PTXFy"
EVE = "5HGjWAeFDfFCWPsjFQdVV2Msvz2XtMktvgocEZcCj68kUMaw"
MASTER_URI = "//platform-dev/master"
MASTER = "5DoGfF5cDJWT6G6g7NkMRjTZzMXQGq5TtL3eAtTWrWDf3CLr"

Status = weights_pb2.ChallengeEpochStatus


class Golden:
    """One section of the golden file: the encoding's parts, its digest, a signature."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self.parts = [(label, bytes.fromhex(value)) for label, value in lines]
        found = dict(lines)
        self.sha256 = bytes.fromhex(found.get("sha256", ""))
        self.signature = bytes.fromhex(found.get("signature", ""))

    @property
    def encoding(self) -> bytes:
        return b"".join(data for label, data in self.parts if label not in {"sha256", "signature"})


def golden(section: str) -> Golden:
    lines: list[tuple[str, str]] = []
    current = ""
    for line in GOLDEN_FILE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        if header := re.fullmatch(r"\[(.+)\]", line):
            current = header.group(1)
        elif current == section:
            label, value = line.split(" ")
            lines.append((label, value))
    assert lines, section
    return Golden(lines)


@pytest.fixture(scope="module")
def master() -> Signer:
    return load_signer(MASTER_URI)


RAW_ANSWER = [(BOB, 1.0), (ALICE, 3.0), (EVE, 4.0)]


def golden_results() -> list[weights_pb2.ChallengeEpochResult]:
    """The breakdown of the golden inputs, out of slug order on purpose."""
    return [
        weights_pb2.ChallengeEpochResult(
            slug="gamma",
            challenge_revision=9,
            status=Status.CHALLENGE_EPOCH_STATUS_FAILED,
            failure=weights_pb2.CHALLENGE_FAILURE_TIMEOUT,
            reason="no answer within 10s",
            share_assigned=0.125,
            share_applied=0.0,
        ),
        weights_pb2.ChallengeEpochResult(
            slug="alpha",
            challenge_revision=3,
            status=Status.CHALLENGE_EPOCH_STATUS_OK,
            share_assigned=0.5,
            share_applied=0.5,
            raw_sha256=raw_answer_digest(RAW_ANSWER),
            raw_entry_count=3,
            raw_size_bytes=170,
            paid_entry_count=2,
            scoring_version="v3",
            latency=duration_pb2.Duration(nanos=12_000_000),
        ),
        weights_pb2.ChallengeEpochResult(
            slug="delta",
            challenge_revision=2,
            status=Status.CHALLENGE_EPOCH_STATUS_EMPTY,
            share_assigned=0.0625,
            share_applied=0.0,
            raw_sha256=hashlib.sha256(b"delta answer").digest(),
            raw_entry_count=2,
        ),
        weights_pb2.ChallengeEpochResult(
            slug="beta",
            challenge_revision=5,
            status=Status.CHALLENGE_EPOCH_STATUS_OK,
            share_assigned=0.25,
            share_applied=0.25,
            raw_sha256=hashlib.sha256(b"beta answer").digest(),
            raw_entry_count=2,
        ),
    ]


def golden_vector() -> weights_pb2.WeightVector:
    """The worked example's vector (docs/weights.md, burn policy), unsigned."""
    return weights_pb2.WeightVector(
        netuid=7,
        mechanism_id=1,
        epoch=42,
        epoch_id="ep-0042",
        history_id="h-1",
        create_time=timestamp_pb2.Timestamp(seconds=1_767_225_600, nanos=500_000_000),
        expire_time=timestamp_pb2.Timestamp(seconds=1_767_229_200),
        metagraph_block=5_000_000,
        policy=weights_pb2.SHARE_POLICY_BURN,
        burn_uid=0,
        weights=[
            weights_pb2.UidWeight(uid=0, hotkey=ALICE, weight=0.25),
            weights_pb2.UidWeight(uid=1, hotkey=BOB, weight=0.375),
            weights_pb2.UidWeight(uid=2, hotkey=CHARLIE, weight=0.25),
            weights_pb2.UidWeight(uid=3, hotkey=DAVE, weight=0.125),
        ],
        chain_weights=weights_pb2.ChainWeights(
            uids=[0, 1, 2, 3],
            values=[43690, 65535, 43690, 21845],
            max_weight_limit=65535,
            min_allowed_weights=1,
            version_key=3,
        ),
        inputs_sha256=inputs_digest(17, golden_results()),
        encoding_version=1,
        master_hotkey=MASTER,
    )


# -- golden bytes ---------------------------------------------------------------------


def test_the_golden_file_is_consistent() -> None:
    for section in ("raw-answer", "epoch-inputs"):
        expected = golden(section)
        assert hashlib.sha256(expected.encoding).digest() == expected.sha256, section


def test_raw_answer_digest_matches_the_golden_bytes() -> None:
    assert raw_answer_digest(RAW_ANSWER) == golden("raw-answer").sha256


def test_inputs_digest_matches_the_golden_bytes() -> None:
    assert inputs_digest(17, golden_results()) == golden("epoch-inputs").sha256


def test_vector_signing_bytes_match_the_golden_bytes() -> None:
    expected = golden("weight-vector")
    actual = vector_signing_bytes(golden_vector())
    offset = 0
    for label, data in expected.parts:
        if label == "signature":
            continue
        assert actual[offset : offset + len(data)].hex() == data.hex(), label
        offset += len(data)
    assert actual == expected.encoding


def test_the_frozen_golden_signature_verifies() -> None:
    vector = golden_vector()
    vector.signature = golden("weight-vector").signature
    verify_vector(vector, MASTER)


# -- signing and verification ---------------------------------------------------------


def test_sign_then_verify(master: Signer) -> None:
    vector = golden_vector()
    vector.ClearField("master_hotkey")
    vector.encoding_version = 0
    sign_vector(vector, master)
    assert vector.master_hotkey == MASTER
    assert vector.encoding_version == ENCODING_VERSION
    assert len(vector.signature) == 64
    verify_vector(vector, MASTER)
    first = vector.signature
    sign_vector(vector, master)
    # sr25519 signatures are randomized; each verifies.
    assert vector.signature != first
    verify_vector(vector, MASTER)


def test_a_vector_survives_the_wire(master: Signer) -> None:
    vector = golden_vector()
    sign_vector(vector, master)
    verify_vector(weights_pb2.WeightVector.FromString(vector.SerializeToString()), MASTER)


def test_every_altered_byte_of_the_encoding_fails(master: Signer) -> None:
    message = vector_signing_bytes(golden_vector())
    signature = master.sign(message)
    assert verify_signature(MASTER, message, signature)
    for index in range(len(message)):
        altered = bytearray(message)
        altered[index] ^= 0x01
        assert not verify_signature(MASTER, bytes(altered), signature), index
    assert not verify_signature(MASTER, message[:-1], signature)
    assert not verify_signature(MASTER, message + b"\x00", signature)


def test_every_altered_byte_of_the_signature_fails(master: Signer) -> None:
    vector = golden_vector()
    sign_vector(vector, master)
    for index in range(len(vector.signature)):
        altered = bytearray(vector.signature)
        altered[index] ^= 0x80
        tampered = weights_pb2.WeightVector()
        tampered.CopyFrom(vector)
        tampered.signature = bytes(altered)
        with pytest.raises(VectorRejected) as rejected:
            verify_vector(tampered, MASTER)
        assert rejected.value.check == CHECK_SIGNATURE, index
    for wrong in (b"", vector.signature[:63], vector.signature + b"\x00"):
        tampered.signature = wrong
        with pytest.raises(VectorRejected) as rejected:
            verify_vector(tampered, MASTER)
        assert rejected.value.check == CHECK_SIGNATURE
        assert rejected.value.reason == (
            f"signature: not a valid signature by {MASTER} over the vector's canonical "
            f"encoding ({len(wrong)} bytes)"
        )


def _changed_scalar(field: FieldDescriptor, value: object) -> object:
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{value}x"
    if field.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        return value + b"\x00"
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        assert isinstance(value, float)
        return value + 0.5
    if field.type == FieldDescriptor.TYPE_BOOL:
        return not value
    assert isinstance(value, int)
    # Integers and enums: an in-range neighbour.
    return value - 1 if value else value + 1


Mutation = tuple[str, Callable[[weights_pb2.WeightVector], None]]


def _mutations() -> Iterator[Mutation]:
    """One change per scalar leaf of a vector (every field, every element, every nested
    field), plus presence changes, and removed and added repeated elements."""
    template = golden_vector()

    def walk(path: list[str | int], message: Any, top: str) -> Iterator[Mutation]:
        for field in message.DESCRIPTOR.fields:
            name = field.name
            if not path and name == "signature":
                continue
            where: list[str | int] = [*path, name]
            value = getattr(message, name)
            repeated = field.is_repeated
            if repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
                for index, item in enumerate(value):
                    yield from walk([*where, index], item, top or name)
                yield _mutation([*where], "remove-last", None, top or name)
                yield _mutation([*where], "add", None, top or name)
            elif repeated:
                for index, item in enumerate(value):
                    yield _mutation(
                        [*where, index], "set", _changed_scalar(field, item), top or name
                    )
                yield _mutation([*where], "add", None, top or name)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                yield from walk(where, value, top or name)
                yield _mutation(where, "clear", None, top or name)
            else:
                yield _mutation(where, "set", _changed_scalar(field, value), top or name)

    yield from walk([], template, "")


def _mutation(path: list[str | int], action: str, value: object, top: str) -> Mutation:
    label = ".".join(str(p) for p in path) + f" ({action})"

    def apply(vector: weights_pb2.WeightVector) -> None:
        target: Any = vector
        for step in path[:-1]:
            target = target[step] if isinstance(step, int) else getattr(target, step)
        last = path[-1]
        if isinstance(last, int):
            target[last] = value
        elif action == "set":
            setattr(target, last, value)
        elif action == "clear":
            target.ClearField(last)
        elif action == "remove-last":
            del getattr(target, last)[-1]
        else:
            items = getattr(target, last)
            if hasattr(items, "add"):
                items.add()
            else:
                items.append(0)

    return f"{top}: {label}", apply


def test_altering_any_field_fails_verification(master: Signer) -> None:
    signed = golden_vector()
    sign_vector(signed, master)
    covered: set[str] = set()
    count = 0
    for label, apply in _mutations():
        tampered = weights_pb2.WeightVector()
        tampered.CopyFrom(signed)
        apply(tampered)
        assert tampered != signed, label
        with pytest.raises(VectorRejected) as rejected:
            verify_vector(tampered, MASTER)
        top = label.split(":")[0]
        expected = {
            "encoding_version": CHECK_ENCODING_VERSION,
            "master_hotkey": CHECK_MASTER_HOTKEY,
        }.get(top, CHECK_SIGNATURE)
        assert rejected.value.check == expected, label
        covered.add(top)
        count += 1
    every_field = {f.name for f in weights_pb2.WeightVector.DESCRIPTOR.fields} - {"signature"}
    assert covered == every_field
    assert count > 40


def test_the_master_hotkey_must_be_the_expected_one(master: Signer) -> None:
    vector = golden_vector()
    sign_vector(vector, master)
    with pytest.raises(VectorRejected) as rejected:
        verify_vector(vector, BOB)
    assert rejected.value.check == CHECK_MASTER_HOTKEY
    assert rejected.value.reason == f"master_hotkey: signed by {MASTER!r}, expected {BOB!r}"


def test_a_signature_by_another_key_under_the_expected_name_fails() -> None:
    vector = golden_vector()
    sign_vector(vector, load_signer("//Bob"))
    vector.master_hotkey = MASTER
    with pytest.raises(VectorRejected) as rejected:
        verify_vector(vector, MASTER)
    assert rejected.value.check == CHECK_SIGNATURE


@pytest.mark.parametrize("version", [0, 2, 4_294_967_295])
def test_an_unknown_encoding_version_is_refused(master: Signer, version: int) -> None:
    vector = golden_vector()
    sign_vector(vector, master)
    vector.encoding_version = version
    with pytest.raises(VectorRejected) as rejected:
        verify_vector(vector, MASTER)
    assert rejected.value.check == CHECK_ENCODING_VERSION
    assert rejected.value.reason == (
        f"encoding_version: unknown version {version}; this verifier knows 1"
    )


def test_the_sdks_wrapped_form_is_not_accepted(master: Signer) -> None:
    message = vector_signing_bytes(golden_vector())
    wrapped = master.sign(b"<Bytes>" + message + b"</Bytes>")
    # The SDK alone would accept it; this module must not.
    assert sp_core.verify(message, wrapped, MASTER, sp_core.CRYPTO_SR25519)
    assert not verify_signature(MASTER, message, wrapped)


# -- values without an encoding --------------------------------------------------------


def test_nan_cannot_be_signed_or_verified(master: Signer) -> None:
    vector = golden_vector()
    vector.weights[1].weight = float("nan")
    vector.ClearField("master_hotkey")
    vector.encoding_version = 0
    before = vector.SerializeToString()
    with pytest.raises(
        EncodingError, match=r"^weights\[1\]\.weight: NaN has no canonical encoding$"
    ):
        sign_vector(vector, master)
    assert vector.SerializeToString() == before
    vector.master_hotkey = MASTER
    vector.encoding_version = 1
    vector.signature = master.sign(b"anything")
    with pytest.raises(VectorRejected) as rejected:
        verify_vector(vector, MASTER)
    assert rejected.value.check == CHECK_ENCODING
    assert rejected.value.reason == (
        "encoding: the vector has no canonical encoding "
        "(weights[1].weight: NaN has no canonical encoding)"
    )


def test_a_negative_enum_value_has_no_encoding() -> None:
    vector = golden_vector()
    vector.policy = -1  # type: ignore[assignment]
    with pytest.raises(
        EncodingError, match=r"^policy: enum value -1 is negative; it has no encoding$"
    ):
        vector_signing_bytes(vector)


@pytest.mark.parametrize("nanos", [-1, 1_000_000_000])
def test_out_of_range_nanos_have_no_encoding(nanos: int) -> None:
    vector = golden_vector()
    vector.expire_time.nanos = nanos
    with pytest.raises(
        EncodingError, match=rf"^expire_time\.nanos: must be in 0\.\.999999999; got {nanos}$"
    ):
        vector_signing_bytes(vector)


def test_unset_and_default_messages_encode_differently() -> None:
    vector = golden_vector()
    vector.ClearField("create_time")
    unset = vector_signing_bytes(vector)
    vector.create_time.SetInParent()
    assert vector_signing_bytes(vector) != unset
    vector.ClearField("chain_weights")
    unset = vector_signing_bytes(vector)
    vector.chain_weights.SetInParent()
    assert vector_signing_bytes(vector) != unset


def test_negative_zero_encodes_as_zero() -> None:
    vector = golden_vector()
    vector.weights[0].weight = 0.0
    zero = vector_signing_bytes(vector)
    vector.weights[0].weight = -0.0
    assert vector_signing_bytes(vector) == zero
    assert raw_answer_digest([(ALICE, -0.0)]) == raw_answer_digest([(ALICE, 0.0)])


def test_unknown_fields_are_not_covered(master: Signer) -> None:
    vector = golden_vector()
    sign_vector(vector, master)
    # Field 99, varint 1: what a newer master might add.
    received = weights_pb2.WeightVector.FromString(vector.SerializeToString() + b"\x98\x06\x01")
    assert received.SerializeToString() != vector.SerializeToString()
    verify_vector(received, MASTER)


# -- digests ----------------------------------------------------------------------------


def test_raw_answer_digest_ignores_entry_order() -> None:
    assert raw_answer_digest(reversed(RAW_ANSWER)) == raw_answer_digest(RAW_ANSWER)
    assert raw_answer_digest([(ALICE, 3.0)]) != raw_answer_digest([(ALICE, 3.5)])
    assert raw_answer_digest([(ALICE, 3.0)]) != raw_answer_digest([(BOB, 3.0)])


def test_the_empty_answer_digest() -> None:
    expected = hashlib.sha256(b"platform-network/raw-answer/v1\x00" + bytes(4)).digest()
    assert raw_answer_digest([]) == expected


def test_raw_answer_refusals() -> None:
    with pytest.raises(EncodingError, match=rf"^entries: duplicate hotkey '{ALICE}'$"):
        raw_answer_digest([(ALICE, 1.0), (BOB, 1.0), (ALICE, 2.0)])
    with pytest.raises(EncodingError, match=r"^entries\[2\]\.score: NaN has no canonical"):
        raw_answer_digest([(EVE, 1.0), (ALICE, 1.0), (BOB, float("nan"))])


def test_inputs_digest_ignores_order_and_covers_its_fields() -> None:
    results = golden_results()
    base = inputs_digest(17, results)
    assert inputs_digest(17, list(reversed(results))) == base
    assert inputs_digest(18, results) != base
    covered = {
        "slug": "alphb",
        "challenge_revision": 4,
        "status": Status.CHALLENGE_EPOCH_STATUS_EMPTY,
        "share_assigned": 0.375,
        "share_applied": 0.375,
        "raw_sha256": bytes(32),
        "raw_entry_count": 4,
    }
    for name, value in covered.items():
        changed = golden_results()
        setattr(changed[1], name, value)
        assert inputs_digest(17, changed) != base, name
    not_covered = {
        "failure": weights_pb2.CHALLENGE_FAILURE_ERROR,
        "reason": "another reason",
        "raw_size_bytes": 1,
        "paid_entry_count": 9,
        "scoring_version": "v4",
    }
    for name, value in not_covered.items():
        changed = golden_results()
        setattr(changed[1], name, value)
        assert inputs_digest(17, changed) == base, name


def test_inputs_digest_refuses_duplicate_slugs() -> None:
    results = golden_results()
    with pytest.raises(EncodingError, match=r"^challenges: duplicate slug 'alpha'$"):
        inputs_digest(17, [*results, results[1]])


def test_the_golden_vector_is_the_worked_example() -> None:
    # docs/weights.md cites the golden vector as the worked example's burn-policy vector.
    case = case_named("worked example, burn")
    allocation = allocate(
        case.challenges, case.metagraph, burn_uid=case.burn_uid, policy=case.policy
    )
    vector = golden_vector()
    assert [(w.uid, w.weight) for w in vector.weights] == list(allocation.weights)
    uids, values = normalize(list(vector.chain_weights.uids), [w.weight for w in vector.weights])
    assert (uids, values) == (list(vector.chain_weights.uids), list(vector.chain_weights.values))
