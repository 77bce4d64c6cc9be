"""What a validator checks before it submits a weight vector. Pure: no I/O, no clock.

A vector reaches the chain only if every check here passes, in this order:

1. the signature (``platform_common.vectors.verify_vector``): a known encoding version,
   signed by the master hotkey of the agent's **own** configuration, over the canonical
   encoding. A vector that fails is not *authentic*: nothing in it is trusted, not even
   its epoch id, so it never occupies an epoch's slot in the agent's store;
2. the subnet: ``netuid`` and ``mechanism_id`` are the agent's;
3. the shape: an epoch >= 1, an epoch id, a history id, both timestamps, and a
   ``chain_weights`` the chain interface accepts as a u16 vector;
4. the clock: not created further in the future than the tolerated skew (the master's
   and the agent's clocks disagree, so expiry checks cannot be trusted);
5. freshness: ``now < expire_time``;
6. order: newer than the last vector claimed for submission (a higher epoch in the same
   history; across histories a later ``create_time``).

Checks 1-4 refuse the vector as ``REJECTED_INVALID`` (an alarm for operators); 5 and 6
skip it as ``SKIPPED_STALE``. Right before submitting, :func:`check_chain_form` compares
the vector with what the chain's current hyperparameters make of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from platform_common import vectors
from platform_common.chain.interface import ChainWeights, Hyperparameters
from platform_network.v1 import weights_pb2

Outcome = weights_pb2.SubmissionOutcome
REJECTED_INVALID = Outcome.SUBMISSION_OUTCOME_REJECTED_INVALID
SKIPPED_STALE = Outcome.SUBMISSION_OUTCOME_SKIPPED_STALE

MAX_EPOCH_ID = 64
_NS = 1_000_000_000


@dataclass(frozen=True)
class Expectations:
    """What the agent's configuration says every vector must match."""

    master_hotkey: str
    netuid: int
    mechanism_id: int
    clock_skew: float  # seconds a create_time may lie in the future


@dataclass(frozen=True)
class Position:
    """Where a vector sits in the master's sequence: the unit of "newer than"."""

    history_id: str
    epoch: int
    create_time_ns: int

    @classmethod
    def of(cls, vector: weights_pb2.WeightVector) -> Position:
        return cls(vector.history_id, vector.epoch, vector.create_time.ToNanoseconds())


@dataclass(frozen=True)
class Refusal:
    """Why a vector is not submitted."""

    check: str  # short, machine-readable: "signature", "netuid", "expired", ...
    outcome: weights_pb2.SubmissionOutcome.ValueType  # the outcome reported
    message: str
    authentic: bool  # the signature verified: the vector's fields can be trusted


def is_newer(position: Position, last: Position | None) -> bool:
    """Whether ``position`` comes after ``last`` (None: nothing claimed yet)."""
    if last is None:
        return True
    if position.history_id == last.history_id:
        return position.epoch > last.epoch
    return position.create_time_ns > last.create_time_ns


def chain_weights_of(vector: weights_pb2.WeightVector) -> ChainWeights:
    """The vector's u16 form as the chain interface takes it; ValueError when malformed."""
    form = vector.chain_weights
    return ChainWeights(
        uids=tuple(form.uids),
        values=tuple(form.values),
        max_weight_limit=form.max_weight_limit,
        min_allowed_weights=form.min_allowed_weights,
        version_key=form.version_key,
    )


def check_vector(
    vector: weights_pb2.WeightVector,
    expect: Expectations,
    last: Position | None,
    now_ns: int,
) -> Refusal | None:
    """The first check ``vector`` fails at ``now_ns`` (Unix time in nanoseconds), given
    ``last``, the newest vector already claimed for submission; None when it passes."""
    try:
        vectors.verify_vector(vector, expect.master_hotkey)
    except vectors.VectorRejected as exc:
        return Refusal(exc.check, REJECTED_INVALID, exc.reason, authentic=False)

    def invalid(check: str, message: str) -> Refusal:
        return Refusal(check, REJECTED_INVALID, message, authentic=True)

    if vector.netuid != expect.netuid:
        return invalid("netuid", f"netuid: the vector is for {vector.netuid}, not {expect.netuid}")
    if vector.mechanism_id != expect.mechanism_id:
        return invalid(
            "mechanism_id",
            f"mechanism_id: the vector is for {vector.mechanism_id}, not {expect.mechanism_id}",
        )
    shape = _shape_problem(vector)
    if shape is not None:
        return invalid("shape", shape)
    created = vector.create_time.ToNanoseconds()
    skew_ns = int(expect.clock_skew * _NS)
    if created > now_ns + skew_ns:
        return invalid(
            "create_time",
            f"create_time: {(created - now_ns) / _NS:.1f} s in the future (more than the "
            f"tolerated clock skew of {expect.clock_skew:g} s): the master's clock and this "
            "host's disagree",
        )
    expires = vector.expire_time.ToNanoseconds()
    if now_ns >= expires:
        return Refusal(
            "expired",
            SKIPPED_STALE,
            f"expired {(now_ns - expires) / _NS:.1f} s ago (expire_time "
            f"{vector.expire_time.ToJsonString()}); an expired vector is never submitted",
            authentic=True,
        )
    if not is_newer(Position.of(vector), last):
        assert last is not None
        return Refusal(
            "not_newer",
            SKIPPED_STALE,
            f"not newer than epoch {last.epoch} of history {last.history_id}, already taken "
            "for submission",
            authentic=True,
        )
    return None


def check_chain_form(
    vector: weights_pb2.WeightVector,
    hyperparameters: Hyperparameters,
    planned: ChainWeights | ValueError,
) -> Refusal | None:
    """Compare the vector's u16 form with the chain as it is now: ``planned`` is what
    the chain interface's SDK conversion makes of the vector's float weights under
    ``hyperparameters`` (or the ValueError it raised). None when they agree."""

    def invalid(check: str, message: str) -> Refusal:
        return Refusal(check, REJECTED_INVALID, message, authentic=True)

    form = chain_weights_of(vector)
    if form.version_key != hyperparameters.weights_version:
        return invalid(
            "version_key",
            f"chain_weights.version_key: {form.version_key}, but the chain's weights version "
            f"key is {hyperparameters.weights_version} (the chain would refuse it)",
        )
    if isinstance(planned, ValueError):
        return invalid(
            "chain_weights",
            f"chain_weights: the SDK refuses the vector's weights under the chain's current "
            f"hyperparameters ({planned})",
        )
    if planned != form:
        differences = [
            name
            for name in ("uids", "values", "max_weight_limit", "min_allowed_weights")
            if getattr(planned, name) != getattr(form, name)
        ]
        return invalid(
            "chain_weights",
            "chain_weights: the SDK plans a different u16 vector under the chain's current "
            f"hyperparameters (block {hyperparameters.block}; differing: "
            f"{', '.join(differences)}); the hyperparameters changed since the epoch was sealed",
        )
    return None


def _shape_problem(vector: weights_pb2.WeightVector) -> str | None:
    if vector.epoch < 1:
        return f"epoch: must be >= 1; got {vector.epoch}"
    if not 1 <= len(vector.epoch_id) <= MAX_EPOCH_ID:
        return f"epoch_id: must be 1..{MAX_EPOCH_ID} characters; got {len(vector.epoch_id)}"
    if not vector.history_id:
        return "history_id: empty"
    if not vector.HasField("create_time") or not vector.HasField("expire_time"):
        return "create_time and expire_time: both are required"
    if not vector.HasField("chain_weights"):
        return "chain_weights: missing"
    try:
        chain_weights_of(vector)
    except ValueError as exc:
        return f"chain_weights.{exc}"
    return None
