"""Validation of a challenge's weights answer, as the contract orders it (pure, no I/O).

The rules of ``ChallengeInternal.GetWeights`` (proto/platform_network/v1/challenge.proto),
applied in this order; the first rule with a broken instance refuses the whole answer:

1. size      at most ``max_entries`` entries and ``max_response_bytes`` encoded bytes
             (the byte count is checked first: it is known before anything is parsed);
2. shape     HTTP mode only: a JSON object whose "weights" is an object of JSON numbers;
3. hotkey    every hotkey a valid SS58 address of format 42;
4. duplicate no hotkey twice (duplicate JSON keys too);
5. score     every score finite and >= 0, and their sum finite;
6. label     ``scoring_version``: at most 128 characters of printable ASCII.

The shim applies them before an answer leaves the pod; the master applies them again
on receipt (it trusts no pod). Each broken instance is a :class:`Violation` (subject =
field path, description = rule and offending value); at most 16 are kept, the count
of the rest is in the message.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from platform_common import ss58
from platform_common.refusals import FieldViolation
from platform_network.v1 import challenge_pb2

DEFAULT_MAX_ENTRIES = 65_536
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_VIOLATIONS = 16
MAX_SCORING_VERSION = 128
MAX_EPOCH_ID = 64
# Offending strings are quoted in messages up to this many characters.
_SHOWN_CHARS = 64


class Rule(enum.Enum):
    """A validation rule; the value is the label used in metrics."""

    SIZE = "size"
    SHAPE = "shape"
    HOTKEY = "hotkey"
    DUPLICATE = "duplicate"
    SCORE = "score"
    LABEL = "label"


#: google.rpc.PreconditionFailure violation type of each FAILED_PRECONDITION rule.
VIOLATION_TYPES: dict[Rule, str] = {
    Rule.SHAPE: "WEIGHTS_MALFORMED",
    Rule.HOTKEY: "WEIGHTS_INVALID_HOTKEY",
    Rule.DUPLICATE: "WEIGHTS_DUPLICATE_HOTKEY",
    Rule.SCORE: "WEIGHTS_INVALID_SCORE",
    Rule.LABEL: "WEIGHTS_INVALID_LABEL",
}


@dataclass(frozen=True)
class Limits:
    """Size limits of one answer."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES


@dataclass(frozen=True)
class Violation:
    """One broken rule instance: ``subject`` is the field path, e.g. ``entries[17].hotkey``."""

    subject: str
    description: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.description}"


class WeightsRefused(Exception):
    """An answer that must not leave the pod.

    ``code`` is the gRPC status name to answer with (RESOURCE_EXHAUSTED for the size
    rule, FAILED_PRECONDITION otherwise); ``violation_type`` the PreconditionFailure
    type, or ``None`` for the size rule.
    """

    def __init__(self, rule: Rule, violations: Sequence[Violation], total: int) -> None:
        self.rule = rule
        self.violations = tuple(violations[:MAX_VIOLATIONS])
        self.total = total
        first = str(self.violations[0])
        self.message = first if total == 1 else f"{first}; and {total - 1} more"
        super().__init__(self.message)

    @property
    def code(self) -> str:
        return "RESOURCE_EXHAUSTED" if self.rule is Rule.SIZE else "FAILED_PRECONDITION"

    @property
    def violation_type(self) -> str | None:
        return VIOLATION_TYPES.get(self.rule)


def _refuse(rule: Rule, subject: str, description: str) -> WeightsRefused:
    return WeightsRefused(rule, [Violation(subject, description)], 1)


def show(value: str) -> str:
    """A string value as messages quote it: JSON-quoted, cut after 64 characters."""
    if len(value) > _SHOWN_CHARS:
        return json.dumps(value[:_SHOWN_CHARS] + "...")
    return json.dumps(value)


def show_score(score: float) -> str:
    """A score as messages show it: NaN, inf, -inf, or Python's shortest repr."""
    if math.isnan(score):
        return "NaN"
    return repr(score)


# --- the request -------------------------------------------------------------------


def request_violations(request: challenge_pb2.GetWeightsRequest) -> list[FieldViolation]:
    """What makes a GetWeights request malformed (INVALID_ARGUMENT); empty when fine."""
    out: list[FieldViolation] = []
    if request.epoch <= 0:
        out.append(FieldViolation("epoch", f"must be >= 1; got {request.epoch}"))
    if not request.epoch_id:
        out.append(FieldViolation("epoch_id", "must not be empty"))
    elif len(request.epoch_id) > MAX_EPOCH_ID:
        out.append(
            FieldViolation(
                "epoch_id",
                f"at most {MAX_EPOCH_ID} characters; got {len(request.epoch_id)}",
            )
        )
    return out


# --- rule 1: size ------------------------------------------------------------------


def check_size(size: int | None, limits: Limits) -> None:
    """Refuse an encoded answer larger than the limit. ``size`` is ``None`` when the
    answer was cut off at the limit without knowing its full length."""
    limit = limits.max_response_bytes
    if size is None:
        raise _refuse(Rule.SIZE, "response", f"at most {limit} bytes allowed; got more")
    if size > limit:
        raise _refuse(Rule.SIZE, "response", f"at most {limit} bytes allowed; got {size}")


def check_count(count: int, limits: Limits) -> None:
    """Refuse an answer with more entries than the limit."""
    if count > limits.max_entries:
        raise _refuse(Rule.SIZE, "entries", f"at most {limits.max_entries} allowed; got {count}")


# --- rules 3 to 6 ------------------------------------------------------------------


def check_entries(
    hotkeys: Sequence[str], scores: Sequence[float], scoring_version: str, limits: Limits
) -> None:
    """Rules 1 (count), 3, 4, 5 and 6 over parallel hotkey and score sequences.

    Each rule is first checked for the whole answer at once (set operations, ``sum``
    and ``min``, the cache of valid SS58 addresses), which is all a valid answer
    costs; only an answer that breaks a rule is walked entry by entry, to name the
    offending entries."""
    check_count(len(hotkeys), limits)
    distinct = set(hotkeys)
    if not ss58.all_valid(distinct):
        _check_rule(Rule.HOTKEY, _hotkey_violations(hotkeys))
    if len(distinct) != len(hotkeys):
        _check_rule(Rule.DUPLICATE, _duplicate_violations(hotkeys))
    if not _scores_valid(scores):
        _check_rule(Rule.SCORE, _score_violations(scores))
    if not _label_valid(scoring_version):
        _check_rule(Rule.LABEL, _label_violations(scoring_version))


def _scores_valid(scores: Sequence[float]) -> bool:
    """Whether rule 5 holds: a finite sum means no score is NaN or infinite (either
    would make the sum NaN or infinite), and then ``min`` finds any negative one."""
    return math.isfinite(sum(scores)) and (not scores or min(scores) >= 0.0)


def _label_valid(label: str) -> bool:
    # Printable ASCII is exactly " " to "~".
    return len(label) <= MAX_SCORING_VERSION and label.isascii() and label.isprintable()


def _check_rule(rule: Rule, violations: Iterable[Violation]) -> None:
    kept: list[Violation] = []
    total = 0
    for violation in violations:
        total += 1
        if len(kept) < MAX_VIOLATIONS:
            kept.append(violation)
    if total:
        raise WeightsRefused(rule, kept, total)


def _hotkey_violations(hotkeys: Sequence[str]) -> Iterable[Violation]:
    check = ss58.check
    for index, hotkey in enumerate(hotkeys):
        reason = check(hotkey)
        if reason is not None:
            yield Violation(
                f"entries[{index}].hotkey",
                f"not a valid SS58 address ({reason}); got {show(hotkey)}",
            )


def _duplicate_violations(hotkeys: Sequence[str]) -> Iterable[Violation]:
    first_seen: dict[str, int] = {}
    for index, hotkey in enumerate(hotkeys):
        earlier = first_seen.setdefault(hotkey, index)
        if earlier != index:
            yield Violation(
                f"entries[{index}].hotkey",
                f"duplicate of entries[{earlier}].hotkey; got {show(hotkey)}",
            )


def _score_violations(scores: Sequence[float]) -> Iterable[Violation]:
    broken = False
    for index, score in enumerate(scores):
        # `not score >= 0` is also true for NaN.
        if not score >= 0.0 or score == math.inf:
            broken = True
            yield Violation(
                f"entries[{index}].score", f"must be finite and >= 0; got {show_score(score)}"
            )
    if not broken:
        total = sum(scores)
        if not math.isfinite(total):
            yield Violation("entries", f"sum of scores must be finite; got {show_score(total)}")


def _label_violations(label: str) -> Iterable[Violation]:
    if len(label) > MAX_SCORING_VERSION:
        yield Violation(
            "scoring_version", f"at most {MAX_SCORING_VERSION} characters; got {len(label)}"
        )
    elif not all(" " <= ch <= "~" for ch in label):
        yield Violation("scoring_version", f"must be printable ASCII; got {show(label)}")


# --- gRPC answers ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A validated answer, with its entries read out once as parallel lists (reading
    the fields of a parsed message costs about as much as validating them)."""

    response: challenge_pb2.GetWeightsResponse
    hotkeys: list[str]
    scores: list[float]


def validate_response(response: challenge_pb2.GetWeightsResponse, limits: Limits) -> Answer:
    """Apply rules 1 (count) and 3 to 6 to a parsed answer."""
    entries = response.entries
    check_count(len(entries), limits)  # before copying a million entries into lists
    hotkeys: list[str] = []
    scores: list[float] = []
    add_hotkey, add_score = hotkeys.append, scores.append
    for entry in entries:  # one pass: each entry's wrapper is built once
        add_hotkey(entry.hotkey)
        add_score(entry.score)
    check_entries(hotkeys, scores, response.scoring_version, limits)
    return Answer(response, hotkeys, scores)


def read_grpc_answer(raw: bytes, limits: Limits) -> Answer:
    """Validate an encoded GetWeightsResponse: size on the raw bytes, then the rest."""
    check_size(len(raw), limits)
    try:
        response = challenge_pb2.GetWeightsResponse.FromString(raw)
    except DecodeError as exc:
        raise _refuse(
            Rule.SHAPE, "response", f"not a valid GetWeightsResponse encoding ({exc})"
        ) from exc
    return validate_response(response, limits)


# --- HTTP answers ------------------------------------------------------------------


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as the list of its members, so duplicate keys stay visible."""


def _json_constant(name: str) -> float:
    # NaN, Infinity and -Infinity are not JSON; Python's parser accepts them. They are
    # kept as floats so the score rule names the entry that carried them.
    return float(name.lower().replace("infinity", "inf"))


def _json_kind(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return f"string {show(value)}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return "number"


def parse_http_answer(body: bytes, limits: Limits) -> challenge_pb2.GetWeightsResponse:
    """Validate the body of GET /internal/v1/get_weights and translate it.

    The body is ``{"weights": {"<hotkey>": <score>, ...}}``; an optional
    ``"scoring_version"`` string becomes the answer's label. Entry ``i`` is the
    ``i``-th member of the "weights" object, in document order.
    """
    check_size(len(body), limits)
    try:
        document = json.loads(
            body.decode("utf-8"), object_pairs_hook=_Pairs, parse_constant=_json_constant
        )
    except UnicodeDecodeError as exc:
        raise _refuse(Rule.SHAPE, "body", f"must be UTF-8 JSON ({exc.reason})") from exc
    except (ValueError, RecursionError) as exc:
        raise _refuse(Rule.SHAPE, "body", f"must be a JSON document ({exc})") from exc
    if not isinstance(document, _Pairs):
        raise _refuse(Rule.SHAPE, "body", f"must be a JSON object; got {_json_kind(document)}")
    members: dict[str, Any] = {}
    for key, value in document:
        if key in ("weights", "scoring_version") and key in members:
            raise _refuse(Rule.SHAPE, key, "appears twice in the body")
        members[key] = value
    if "weights" not in members:
        raise _refuse(Rule.SHAPE, "weights", 'required: the body has no "weights" member')
    weights = members["weights"]
    if not isinstance(weights, _Pairs):
        raise _refuse(Rule.SHAPE, "weights", f"must be a JSON object; got {_json_kind(weights)}")
    label = members.get("scoring_version", "")
    if not isinstance(label, str):
        raise _refuse(
            Rule.SHAPE, "scoring_version", f"must be a JSON string; got {_json_kind(label)}"
        )
    check_count(len(weights), limits)
    hotkeys = [hotkey for hotkey, _ in weights]
    scores: list[float] = []
    shape = _score_shape_violations(weights, scores)
    _check_rule(Rule.SHAPE, shape)
    check_entries(hotkeys, scores, label, limits)
    return challenge_pb2.GetWeightsResponse(
        entries=[
            challenge_pb2.WeightEntry(hotkey=hotkey, score=score)
            for hotkey, score in zip(hotkeys, scores, strict=True)
        ],
        scoring_version=label,
    )


def _score_shape_violations(
    weights: Sequence[tuple[str, Any]], scores: list[float]
) -> Iterable[Violation]:
    """Convert each value to a float into ``scores``; yield the ones that are not numbers."""
    for index, (_hotkey, value) in enumerate(weights):
        if isinstance(value, float):
            scores.append(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                scores.append(float(value))
            except OverflowError:
                # A JSON integer beyond double range: the score rule refuses it as inf.
                scores.append(math.inf if value > 0 else -math.inf)
        else:
            scores.append(math.nan)
            yield Violation(
                f"entries[{index}].score", f"must be a JSON number; got {_json_kind(value)}"
            )
