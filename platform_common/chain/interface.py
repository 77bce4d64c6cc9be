"""The chain as the platform sees it: values read from a subnet and the one write it makes.

Everything here is plain data plus the :class:`Chain` protocol; the implementations
(the Bittensor SDK over a real node, or over the local simulated subnet) live in
:mod:`platform_common.chain.sdk_chain`.
"""

from __future__ import annotations

import enum
import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from bittensor import Signer

U16_MAX = 65535


class SubnetNotFoundError(LookupError):
    """The chain has no subnet with the requested netuid (at the requested block)."""


@dataclass(frozen=True)
class Neuron:
    """One UID of a subnet at one block."""

    uid: int
    hotkey: str  # SS58, format 42
    coldkey: str
    validator_permit: bool
    stake: float  # the neuron's total stake in the subnet's alpha, as the SDK reports it


@dataclass(frozen=True)
class Metagraph:
    """A subnet's neurons at one block, ordered by uid."""

    netuid: int
    block: int
    neurons: tuple[Neuron, ...]

    def __post_init__(self) -> None:
        uids = [n.uid for n in self.neurons]
        if any(b <= a for a, b in itertools.pairwise(uids)):
            raise ValueError("neurons must be ordered by strictly ascending uid")
        if len({n.hotkey for n in self.neurons}) != len(self.neurons):
            raise ValueError("a hotkey can hold only one uid on a subnet")

    @functools.cached_property
    def hotkey_to_uid(self) -> Mapping[str, int]:
        """The subnet's hotkey -> uid mapping at this block (built once, read-only)."""
        return MappingProxyType({n.hotkey: n.uid for n in self.neurons})

    @functools.cached_property
    def _uid_to_neuron(self) -> Mapping[int, Neuron]:
        return MappingProxyType({n.uid: n for n in self.neurons})

    def uid_of(self, hotkey: str) -> int | None:
        """The uid ``hotkey`` holds at this block, or None when it is not registered."""
        return self.hotkey_to_uid.get(hotkey)

    def hotkey_of(self, uid: int) -> str | None:
        """The hotkey holding ``uid`` at this block, or None for an unknown uid."""
        neuron = self._uid_to_neuron.get(uid)
        return neuron.hotkey if neuron is not None else None

    def neuron(self, uid: int) -> Neuron | None:
        """The neuron at ``uid``, or None for an unknown uid."""
        return self._uid_to_neuron.get(uid)


@dataclass(frozen=True)
class Hyperparameters:
    """The subnet hyperparameters that shape weight submission, read at one block."""

    netuid: int
    block: int
    tempo: int
    weights_rate_limit: int  # blocks between two weight submissions by the same hotkey
    max_weight_limit: int  # raw u16: the largest share one uid may get is this / 65535
    min_allowed_weights: int
    commit_reveal_enabled: bool
    weights_version: int  # the smallest version_key a submission may carry


@dataclass(frozen=True)
class ChainWeights:
    """A weight vector in the u16 form the SDK submits, for the hyperparameters it was made for."""

    uids: tuple[int, ...]  # strictly ascending
    values: tuple[int, ...]  # 1..65535, the largest is 65535
    max_weight_limit: int
    min_allowed_weights: int
    version_key: int

    def __post_init__(self) -> None:
        if not self.uids:
            raise ValueError("uids: a weight vector needs at least one non-zero weight")
        if len(self.uids) != len(self.values):
            raise ValueError(
                f"values: {len(self.values)} values for {len(self.uids)} uids; they must pair up"
            )
        if any(not 0 <= uid <= U16_MAX for uid in self.uids):
            raise ValueError("uids: every uid must be in 0..65535")
        if any(b <= a for a, b in itertools.pairwise(self.uids)):
            raise ValueError("uids: must be strictly ascending")
        if any(not 1 <= value <= U16_MAX for value in self.values):
            raise ValueError("values: every value must be in 1..65535 (zeros are dropped)")
        if max(self.values) != U16_MAX:
            raise ValueError("values: the largest value must be 65535")
        if self.version_key < 0:
            raise ValueError("version_key: must not be negative")

    def as_mapping(self) -> dict[int, int]:
        """``{uid: u16 value}``."""
        return dict(zip(self.uids, self.values, strict=True))


class SubmitOutcome(enum.Enum):
    """What became of a weight submission."""

    SUBMITTED = "submitted"  # plaintext weights included in a block
    COMMITTED = "committed"  # commit-reveal: the timelock-encrypted commit was included
    RATE_LIMITED = "rate_limited"  # refused before signing: too soon after the last one
    FAILED = "failed"  # refused by the chain or the SDK, or the chain was unreachable


@dataclass(frozen=True)
class SubmitResult:
    """The outcome of one :meth:`Chain.set_weights` call."""

    outcome: SubmitOutcome
    block: int  # the including block, or the block the refusal was decided at
    extrinsic_hash: str  # "0x" + 64 lowercase hex when an extrinsic was included, else ""
    message: str
    next_allowed_block: int = 0  # for RATE_LIMITED: the first block a submission is allowed
    reveal_round: int = 0  # for COMMITTED: the drand round at which the chain reveals it


class Chain(Protocol):
    """A subnet on a chain: the reads the master needs and the write validators make."""

    netuid: int

    async def current_block(self) -> int:
        """The chain head's block number."""
        ...

    async def metagraph(self, block: int | None = None) -> Metagraph:
        """The subnet's neurons at ``block`` (the head when None)."""
        ...

    async def hyperparameters(self, block: int | None = None) -> Hyperparameters:
        """The subnet's weight-related hyperparameters at ``block`` (the head when None)."""
        ...

    def plan_weights(
        self, weights: Mapping[int, float], hyperparameters: Hyperparameters
    ) -> ChainWeights:
        """The u16 vector the SDK submits for ``weights`` under ``hyperparameters``.

        Pure. Raises ValueError when the SDK would refuse the vector.
        """
        ...

    async def set_weights(
        self, keypair: Signer, weights: ChainWeights, *, mechanism_id: int = 0
    ) -> SubmitResult:
        """Submit ``weights`` signed by the hotkey ``keypair`` through the SDK's SetWeights."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...
