"""Canonical encodings of weight vectors and epoch inputs, their digests, and the
vector signature.

The encodings are fixed byte layouts, not protobuf serializations (which may order
fields differently, drop or keep defaults and carry unknown fields): the same values
always give the same bytes, in any language. Each starts with its own domain-separation
prefix, so a signature or digest over one can never be taken for one over anything else.
docs/weights.md has the layouts as tables.

Primitive encodings, all big-endian:

* u32, u64, i64: fixed width; enums as u32 (negative enum values are refused);
* f64: IEEE-754 binary64; NaN is refused and -0.0 is written as +0.0, so numbers that
  compare equal encode equally;
* string: u32 byte length, then UTF-8; bytes: u32 length, then the bytes;
* repeated: u32 count, then each item;
* Timestamp: i64 seconds, u32 nanos (0..999,999,999);
* an optional message (proto3 message field): u8 0 when unset, u8 1 then its fields.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from operator import attrgetter, itemgetter

from google.protobuf import timestamp_pb2

from platform_common.keys import Signer, verify_signature
from platform_network.v1 import weights_pb2

ENCODING_VERSION = 1
"""The canonical vector encoding this module writes and verifies."""

VECTOR_PREFIX = b"platform-network/weight-vector/v1\x00"
INPUTS_PREFIX = b"platform-network/epoch-inputs/v1\x00"
RAW_ANSWER_PREFIX = b"platform-network/raw-answer/v1\x00"

# Names of the checks verify_vector can fail, as VectorRejected.check.
CHECK_ENCODING_VERSION = "encoding_version"
CHECK_MASTER_HOTKEY = "master_hotkey"
CHECK_ENCODING = "encoding"
CHECK_SIGNATURE = "signature"

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_TIMESTAMP = struct.Struct(">qI")
_UID_AND_LENGTH = struct.Struct(">II")
_U32_MAX = 0xFFFF_FFFF
_NANOS_MAX = 999_999_999


class EncodingError(ValueError):
    """A value has no canonical encoding (NaN, a negative enum value, out-of-range
    nanos, a duplicate key); the message names the field."""


class VectorRejected(Exception):
    """A vector failed verification. ``check`` names the failed check (one of the
    ``CHECK_*`` constants); ``reason`` says what was wrong."""

    def __init__(self, reason: str, check: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.check = check


def raw_answer_digest(entries: Iterable[tuple[str, float]]) -> bytes:
    """SHA-256 of the canonical encoding of a challenge's raw answer: the entries sorted
    by hotkey (UTF-8 bytes, ascending), each as string hotkey + f64 score.

    Raises EncodingError for a duplicate hotkey or a NaN score.
    """
    items = list(entries)
    # Checked in the caller's order, so an error names the entry as the caller knows it.
    hotkeys = _utf8([hotkey for hotkey, _ in items], "entries", ".hotkey")
    scores = _doubles([score for _, score in items], "entries", ".score")
    ordered = sorted(zip(hotkeys, scores, strict=True), key=itemgetter(0))
    for position in range(1, len(ordered)):
        if ordered[position][0] == ordered[position - 1][0]:
            hotkey = ordered[position][0].decode("utf-8")
            raise EncodingError(f"entries: duplicate hotkey {hotkey!r}")
    out = bytearray(RAW_ANSWER_PREFIX)
    out += _U32.pack(len(ordered))
    for hotkey_bytes, score in ordered:
        out += _U32.pack(len(hotkey_bytes))
        out += hotkey_bytes
        out += _F64.pack(score)
    return hashlib.sha256(out).digest()


def inputs_digest(
    registry_revision: int, challenges: Sequence[weights_pb2.ChallengeEpochResult]
) -> bytes:
    """SHA-256 of the canonical encoding of an epoch's inputs (WeightVector.inputs_sha256):
    i64 registry_revision, then the challenges sorted by slug, each as string slug,
    i64 challenge_revision, u32 status, f64 share_assigned, f64 share_applied,
    bytes raw_sha256, u32 raw_entry_count. Other ChallengeEpochResult fields are not
    covered.

    Raises EncodingError for a duplicate slug or a value without an encoding.
    """
    ordered = sorted(challenges, key=attrgetter("slug"))
    out = bytearray(INPUTS_PREFIX)
    out += _I64.pack(registry_revision)
    out += _U32.pack(len(ordered))
    previous: str | None = None
    for position, result in enumerate(ordered):
        field = f"challenges[{position}]"
        if result.slug == previous:
            raise EncodingError(f"challenges: duplicate slug {result.slug!r}")
        previous = result.slug
        _string(out, result.slug, f"{field}.slug")
        out += _I64.pack(result.challenge_revision)
        _enum(out, result.status, f"{field}.status")
        _double(out, result.share_assigned, f"{field}.share_assigned")
        _double(out, result.share_applied, f"{field}.share_applied")
        _bytes(out, result.raw_sha256)
        out += _U32.pack(result.raw_entry_count)
    return hashlib.sha256(out).digest()


def vector_signing_bytes(vector: weights_pb2.WeightVector) -> bytes:
    """The canonical encoding (version 1) of every field of ``vector`` but ``signature``,
    in field-number order, after the domain-separation prefix. Unknown fields are not
    covered.

    Raises EncodingError when a field has no encoding.
    """
    out = bytearray(VECTOR_PREFIX)
    out += _U32.pack(vector.netuid)
    out += _U32.pack(vector.mechanism_id)
    out += _I64.pack(vector.epoch)
    _string(out, vector.epoch_id, "epoch_id")
    _string(out, vector.history_id, "history_id")
    _timestamp(out, vector.create_time if vector.HasField("create_time") else None, "create_time")
    _timestamp(out, vector.expire_time if vector.HasField("expire_time") else None, "expire_time")
    out += _I64.pack(vector.metagraph_block)
    _enum(out, vector.policy, "policy")
    out += _U32.pack(vector.burn_uid)
    _uid_weights(out, vector.weights)
    if vector.HasField("chain_weights"):
        chain = vector.chain_weights
        out += _U8.pack(1)
        _u32s(out, chain.uids)
        _u32s(out, chain.values)
        out += _U32.pack(chain.max_weight_limit)
        out += _U32.pack(chain.min_allowed_weights)
        out += _U64.pack(chain.version_key)
    else:
        out += _U8.pack(0)
    _bytes(out, vector.inputs_sha256)
    out += _U32.pack(vector.encoding_version)
    _string(out, vector.master_hotkey, "master_hotkey")
    return bytes(out)


def sign_vector(vector: weights_pb2.WeightVector, signer: Signer) -> None:
    """Sign ``vector`` in place: set master_hotkey to the signer's address,
    encoding_version to :data:`ENCODING_VERSION`, and signature.

    Raises EncodingError (and changes nothing) when a field has no encoding.
    """
    previous = (vector.master_hotkey, vector.encoding_version)
    vector.master_hotkey = signer.ss58_address
    vector.encoding_version = ENCODING_VERSION
    try:
        message = vector_signing_bytes(vector)
    except EncodingError:
        vector.master_hotkey, vector.encoding_version = previous
        raise
    vector.signature = signer.sign(message)


def verify_vector(vector: weights_pb2.WeightVector, expected_master_hotkey: str) -> None:
    """Check that ``vector`` is signed by ``expected_master_hotkey`` (the verifier's own
    configuration: the vector's master_hotkey field alone proves nothing).

    Checks, in order: encoding_version is known; master_hotkey equals the expected one;
    the vector has a canonical encoding; the signature verifies over it. Raises
    :class:`VectorRejected` naming the first failed check. Raises ValueError when
    ``expected_master_hotkey`` is not a valid SS58 address.
    """
    if vector.encoding_version != ENCODING_VERSION:
        raise VectorRejected(
            f"encoding_version: unknown version {vector.encoding_version}; this verifier "
            f"knows {ENCODING_VERSION}",
            CHECK_ENCODING_VERSION,
        )
    if vector.master_hotkey != expected_master_hotkey:
        raise VectorRejected(
            # Cut: the field comes from the network and the reason is reported back.
            f"master_hotkey: signed by {vector.master_hotkey[:64]!r}, expected "
            f"{expected_master_hotkey!r}",
            CHECK_MASTER_HOTKEY,
        )
    try:
        message = vector_signing_bytes(vector)
    except EncodingError as exc:
        raise VectorRejected(
            f"encoding: the vector has no canonical encoding ({exc})", CHECK_ENCODING
        ) from None
    if not verify_signature(expected_master_hotkey, message, vector.signature):
        raise VectorRejected(
            f"signature: not a valid signature by {expected_master_hotkey} over the "
            f"vector's canonical encoding ({len(vector.signature)} bytes)",
            CHECK_SIGNATURE,
        )


# -- primitives -------------------------------------------------------------------------


def _string(out: bytearray, value: str, field: str) -> None:
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodingError(f"{field}: not valid Unicode text") from None
    _bytes(out, data)


def _bytes(out: bytearray, value: bytes) -> None:
    # Lengths over u32 cannot occur: gRPC messages are far smaller.
    out += _U32.pack(len(value))
    out += value


def _enum(out: bytearray, value: int, field: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise EncodingError(f"{field}: enum value {value} is negative; it has no encoding")
    out += _U32.pack(value)


def _double(out: bytearray, value: float, field: str) -> None:
    if math.isnan(value):
        raise EncodingError(f"{field}: NaN has no canonical encoding")
    out += _F64.pack(value + 0.0)  # -0.0 + 0.0 is +0.0


def _doubles(values: list[float], field: str, suffix: str) -> list[float]:
    """``values`` checked for NaN and with -0.0 made +0.0 (C-level scans; the Python
    loops run only when a scan finds something)."""
    if any(map(math.isnan, values)):
        position = next(i for i, value in enumerate(values) if math.isnan(value))
        raise EncodingError(f"{field}[{position}]{suffix}: NaN has no canonical encoding")
    if 0.0 in values:  # true for -0.0 too
        return [value + 0.0 for value in values]
    return values


def _timestamp(out: bytearray, stamp: timestamp_pb2.Timestamp | None, field: str) -> None:
    if stamp is None:
        out += _U8.pack(0)
        return
    if not 0 <= stamp.nanos <= _NANOS_MAX:
        raise EncodingError(f"{field}.nanos: must be in 0..{_NANOS_MAX}; got {stamp.nanos}")
    out += _U8.pack(1)
    out += _TIMESTAMP.pack(stamp.seconds, stamp.nanos)


def _u32s(out: bytearray, values: Sequence[int]) -> None:
    out += _U32.pack(len(values))
    out += struct.pack(f">{len(values)}I", *values)


def _uid_weights(out: bytearray, weights: Sequence[weights_pb2.UidWeight]) -> None:
    # Field by field over a list: iterating a protobuf repeated field wraps every item
    # again, which costs more than the encoding itself for 65,536 items.
    items = list(weights)
    out += _U32.pack(len(items))
    values = _doubles([item.weight for item in items], "weights", ".weight")
    uids = [item.uid for item in items]
    hotkeys = _utf8([item.hotkey for item in items], "weights", ".hotkey")
    for uid, hotkey, weight in zip(uids, hotkeys, values, strict=True):
        out += _UID_AND_LENGTH.pack(uid, len(hotkey))
        out += hotkey
        out += _F64.pack(weight)


def _utf8(texts: list[str], field: str, suffix: str) -> list[bytes]:
    try:
        return [text.encode("utf-8") for text in texts]
    except UnicodeEncodeError:
        position = next(i for i, text in enumerate(texts) if not _encodable(text))
        raise EncodingError(f"{field}[{position}]{suffix}: not valid Unicode text") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
