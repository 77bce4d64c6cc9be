"""A local simulated subnet: the chain state the Bittensor SDK reads and writes in dev and tests.

No subtensor node can run here, so this module stands in for the *node*: it keeps the
storage items and runtime-API answers the SDK asks for (``Uids``, ``LastUpdate``,
``WeightsSetRateLimit``, ``SubnetInfoRuntimeApi.get_metagraph``, ...) and applies the
two weight extrinsics the SDK's ``SetWeights`` produces, with the pallet's checks and
error names. Everything above it (metagraph decoding, hyperparameter reads, the u16
weight conversion, the rate-limit preflight, the commit-reveal timelock encryption)
is the real SDK code, run through :class:`platform_common.chain.substrate.SimulatedSubstrate`.

State lives in one JSON file. Every write takes an exclusive ``flock`` on a lock file
beside it and replaces the file atomically, and every read reloads the file when it
changed, so several processes may share one state file. Recent history is kept (see
``history_blocks``) so reads at a past block answer with the state of that block.

Blocks advance with wall-clock time (``block_time`` seconds per block) from an anchor
stored in the file, so every process sharing the file agrees on the head; with
``manual_blocks`` they advance only through :meth:`LocalSubnet.advance`. :meth:`pause`
(called when ``platform chain`` stops) freezes the head; opening the file resumes it.

Not simulated: emissions, consensus, stake movements, fees, and the reveal of
commit-reveal commits (the chain decrypts them with the drand beacon's signature for
their round, which cannot be had offline): commits are stored and readable, and
dropped once their reveal epoch has passed, as the chain drops unrevealed ones.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from bittensor import ChainError
from bittensor._generated.errors import ERRORS
from bittensor.sp_core import Keypair, ss58_decode

from platform_common.chain.conversion import within_max_weight_limit
from platform_common.chain.extrinsic import ExtrinsicRejected, Receipt, extrinsic_hash, verified
from platform_common.chain.interface import U16_MAX
from platform_common.files import write_atomically

T = TypeVar("T")

FORMAT = "platform-local-subnet/1"
RAO_PER_TAO = 10**9
GLOBAL_MAX_SUBNET_COUNT = 4096  # mechanism storage index = mechid * 4096 + netuid
MAX_UNREVEALED_COMMITS = 10
DEFAULT_VALIDATOR_STAKE_TAO = 1000.0
ALPHA = "\u03b1"  # the default token symbol of a subnet

_ERROR_DOCS = {info.name: info.docs for info in ERRORS.values() if info.pallet == "SubtensorModule"}


def dev_keypair(role: str, index: int) -> Any:
    """The deterministic sr25519 keypair ``//platform-dev/{role}/{index}``.

    The simulated subnet's genesis neuron ``uid`` holds ``dev_keypair("hotkey", uid)``
    owned by ``dev_keypair("coldkey", uid)``; tests and dev tools use other indexes
    for keys that register later. Never use these keys on a real network.
    """
    if not role or "/" in role or index < 0:
        raise ValueError("dev_keypair: role must be a non-empty word and index >= 0")
    return Keypair.create_from_uri(f"//platform-dev/{role}/{index}")


@dataclass(frozen=True)
class WeightsOnChain:
    """A validator's weight row as stored on the simulated chain."""

    uid: int
    block: int  # the block the row was set at
    uids: tuple[int, ...]
    values: tuple[int, ...]
    version_key: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightsOnChain:
        """Inverse of :meth:`to_json`."""
        return cls(
            uid=int(data["uid"]),
            block=int(data["block"]),
            uids=tuple(int(u) for u in data["uids"]),
            values=tuple(int(v) for v in data["values"]),
            version_key=int(data["version_key"]),
        )


@dataclass(frozen=True)
class WeightCommit:
    """A timelock-encrypted weight commit waiting for its reveal round."""

    hotkey: str
    uid: int
    block: int
    epoch: int
    reveal_round: int
    commit: str  # 0x hex of the SDK's ciphertext
    commit_reveal_version: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightCommit:
        """Inverse of :meth:`to_json`."""
        return cls(
            hotkey=str(data["hotkey"]),
            uid=int(data["uid"]),
            block=int(data["block"]),
            epoch=int(data["epoch"]),
            reveal_round=int(data["reveal_round"]),
            commit=str(data["commit"]),
            commit_reveal_version=int(data["commit_reveal_version"]),
        )


@dataclass
class SubnetHyperparameters:
    """The settable hyperparameters of the simulated subnet (chain defaults where sensible)."""

    tempo: int = 360
    weights_rate_limit: int = 100
    max_weight_limit: int = U16_MAX
    min_allowed_weights: int = 1
    commit_reveal: bool = False
    weights_version: int = 0
    reveal_period_epochs: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first hyperparameter out of its chain range."""
        ranges = {
            "tempo": (1, U16_MAX),
            "weights_rate_limit": (0, 2**64 - 1),
            "max_weight_limit": (0, U16_MAX),
            "min_allowed_weights": (0, U16_MAX),
            "weights_version": (0, 2**64 - 1),
            "reveal_period_epochs": (1, 2**64 - 1),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}: must be an integer in {low}..{high}; got {value!r}")
        if not isinstance(self.commit_reveal, bool):
            raise ValueError(f"commit_reveal: must be true or false; got {self.commit_reveal!r}")


@dataclass
class _Neuron:
    hotkey: str
    coldkey: str
    stake_rao: int
    validator_permit: bool
    registered_at: int
    last_update: int = 0


@dataclass
class _SubnetState:
    """Storage of the subnet as of one block."""

    hyperparameters: SubnetHyperparameters
    owner_hotkey: str
    owner_coldkey: str
    neurons: list[_Neuron]
    weights: dict[int, WeightsOnChain] = field(default_factory=dict)
    commits: list[WeightCommit] = field(default_factory=list)
    nonces: dict[str, int] = field(default_factory=dict)
    extrinsics_in_block: tuple[int, int] = (0, 0)  # (block, extrinsics included in it)

    def uid_of(self, hotkey: str) -> int | None:
        for uid, neuron in enumerate(self.neurons):
            if neuron.hotkey == hotkey:
                return uid
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "hyperparameters": dataclasses.asdict(self.hyperparameters),
            "owner_hotkey": self.owner_hotkey,
            "owner_coldkey": self.owner_coldkey,
            "neurons": [dataclasses.asdict(n) for n in self.neurons],
            "weights": {str(uid): row.to_json() for uid, row in sorted(self.weights.items())},
            "commits": [c.to_json() for c in self.commits],
            "nonces": dict(sorted(self.nonces.items())),
            "extrinsics_in_block": list(self.extrinsics_in_block),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _SubnetState:
        block, count = data.get("extrinsics_in_block") or (0, 0)
        return cls(
            hyperparameters=SubnetHyperparameters(**data["hyperparameters"]),
            owner_hotkey=str(data["owner_hotkey"]),
            owner_coldkey=str(data["owner_coldkey"]),
            neurons=[_Neuron(**n) for n in data["neurons"]],
            weights={int(k): WeightsOnChain.from_json(v) for k, v in data["weights"].items()},
            commits=[WeightCommit.from_json(c) for c in data["commits"]],
            nonces={str(k): int(v) for k, v in data["nonces"].items()},
            extrinsics_in_block=(int(block), int(count)),
        )


class _DispatchError(Exception):
    """A pallet error: the extrinsic is included, its dispatch fails, its nonce is used."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.docs = _ERROR_DOCS.get(name, name)


def _epoch(block: int, netuid: int, tempo: int) -> tuple[int, int]:
    """(epoch index, blocks since the last epoch), on the chain's classic tempo schedule."""
    position = block + netuid + 1
    return position // (tempo + 1), position % (tempo + 1)


def _check_ss58(value: str, what: str) -> str:
    try:
        ss58_decode(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {value!r} is not an SS58 address") from exc
    return value


class LocalSubnet:
    """One simulated subnet persisted at ``path``; see the module docstring.

    Make one with :meth:`create`, reopen it with :meth:`open`. The async methods are
    shared with :class:`platform_common.chain.remote.RemoteSubnet`, the client of the
    same subnet served by ``platform chain``.
    """

    def __init__(self, path: Path, document: Mapping[str, Any]) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._load(document)
        self._stamp = self._file_stamp()

    # Creation and persistence ------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        netuid: int = 1,
        neurons: int = 32,
        validators: int = 4,
        block_time: float = 12.0,
        manual_blocks: bool = False,
        history_blocks: int = 1024,
        validator_stake: float = DEFAULT_VALIDATOR_STAKE_TAO,
        hyperparameters: SubnetHyperparameters | None = None,
    ) -> LocalSubnet:
        """Create a subnet at block 0 and write its state file (which must not exist).

        Neuron ``uid`` holds ``dev_keypair("hotkey", uid)``; the first ``validators``
        neurons hold validator permits and stake (``validator_stake`` TAO for uid 0,
        decreasing by 10% per uid), the others none. The subnet is full: a later
        :meth:`register` replaces a neuron, as on chain. Uid 0 is the owner's.
        """
        hyper = hyperparameters or SubnetHyperparameters()
        hyper.check()
        if not 0 <= netuid < GLOBAL_MAX_SUBNET_COUNT:
            raise ValueError(f"netuid: must be in 0..{GLOBAL_MAX_SUBNET_COUNT - 1}")
        if not 1 <= neurons <= 4096:
            raise ValueError("neurons: must be in 1..4096")
        if not 0 <= validators <= neurons:
            raise ValueError(f"validators: must be in 0..{neurons} (the number of neurons)")
        _check_timing(block_time, history_blocks)
        if not math.isfinite(validator_stake) or validator_stake < 0:
            raise ValueError("validator_stake: must be a finite number >= 0")
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"{target} already exists; open it with LocalSubnet.open")
        members = [
            _Neuron(
                hotkey=dev_keypair("hotkey", uid).ss58_address,
                coldkey=dev_keypair("coldkey", uid).ss58_address,
                stake_rao=int(validator_stake * 0.9**uid * RAO_PER_TAO) if uid < validators else 0,
                validator_permit=uid < validators,
                registered_at=0,
            )
            for uid in range(neurons)
        ]
        state = _SubnetState(
            hyperparameters=hyper,
            owner_hotkey=members[0].hotkey,
            owner_coldkey=members[0].coldkey,
            neurons=members,
        )
        seed = f"{FORMAT}/{netuid}/{time.time_ns()}/{secrets.token_hex(16)}"
        document = {
            "format": FORMAT,
            "netuid": netuid,
            "genesis_hash": "0x" + hashlib.blake2b(seed.encode(), digest_size=32).hexdigest(),
            "block_time": block_time,
            "manual_blocks": manual_blocks,
            "clock": {"block": 0, "since": None if manual_blocks else time.time()},
            "history_blocks": history_blocks,
            "max_uids": neurons,
            "versions": [{"from_block": 0, "state": state.to_json()}],
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        subnet = cls(target, document)
        with subnet._locked():
            if target.exists():
                raise FileExistsError(f"{target} already exists; open it with LocalSubnet.open")
            subnet._save()
        return subnet

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        block_time: float | None = None,
        manual_blocks: bool | None = None,
    ) -> LocalSubnet:
        """Open an existing state file; resumes a paused clock.

        ``block_time`` / ``manual_blocks`` change the block timing from the current head on.
        """
        target = Path(path)
        try:
            document = json.loads(target.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no simulated subnet state at {target}; create one with LocalSubnet.create "
                "or start `platform chain --state PATH`"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{target} is not a simulated subnet state file: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{target} is not a simulated subnet state file ({FORMAT})")
        subnet = cls(target, document)
        with subnet._locked():
            subnet._refresh()
            head = subnet._head()
            if block_time is not None or manual_blocks is not None:
                new_time = subnet.block_time if block_time is None else block_time
                _check_timing(new_time, subnet.history_blocks)
                subnet.block_time = new_time
                if manual_blocks is not None:
                    subnet.manual_blocks = manual_blocks
            _, since = subnet._clock
            if block_time is not None or manual_blocks is not None or since is None:
                # Re-anchor only when the timing changes or the clock was paused, so
                # processes already sharing the file see no jump.
                subnet._clock = (head, None if subnet.manual_blocks else time.time())
                subnet._save()
        return subnet

    def _load(self, document: Mapping[str, Any]) -> None:
        self.netuid = int(document["netuid"])
        self.genesis_hash = str(document["genesis_hash"])
        self.block_time = float(document["block_time"])
        self.manual_blocks = bool(document["manual_blocks"])
        clock = document["clock"]
        since = clock.get("since")
        self._clock: tuple[int, float | None] = (
            int(clock["block"]),
            None if since is None else float(since),
        )
        self.history_blocks = int(document["history_blocks"])
        self.max_uids = int(document["max_uids"])
        self._versions: list[tuple[int, _SubnetState]] = [
            (int(v["from_block"]), _SubnetState.from_json(v["state"])) for v in document["versions"]
        ]

    def _document(self) -> dict[str, Any]:
        block, since = self._clock
        return {
            "format": FORMAT,
            "netuid": self.netuid,
            "genesis_hash": self.genesis_hash,
            "block_time": self.block_time,
            "manual_blocks": self.manual_blocks,
            "clock": {"block": block, "since": since},
            "history_blocks": self.history_blocks,
            "max_uids": self.max_uids,
            "versions": [{"from_block": b, "state": s.to_json()} for b, s in self._versions],
        }

    def _file_stamp(self) -> tuple[int, int, int]:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return (0, 0, 0)
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _refresh(self) -> None:
        """Reload the file when another process (or instance) has replaced it."""
        stamp = self._file_stamp()
        if stamp not in (self._stamp, (0, 0, 0)):
            self._load(json.loads(self.path.read_text()))
            self._stamp = stamp

    def _save(self) -> None:
        write_atomically(
            self.path, json.dumps(self._document(), separators=(",", ":")), durable=True
        )
        self._stamp = self._file_stamp()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # Clock and history -------------------------------------------------------

    def _head(self) -> int:
        block, since = self._clock
        if since is None or self.manual_blocks:
            return block
        return block + max(0, math.floor((time.time() - since) / self.block_time))

    def _state_at(self, block: int) -> _SubnetState:
        head = self._head()
        if block < 0 or block > head:
            raise ChainError(f"block {block} has not been produced (the head is {head})")
        if block < head - self.history_blocks:
            raise ChainError(
                f"State already discarded for block {block}: the simulated chain keeps the "
                f"last {self.history_blocks} blocks (the head is {head})"
            )
        for from_block, state in reversed(self._versions):
            if from_block <= block:
                return state
        raise ChainError(f"State already discarded for block {block}")

    def _mutate(self, change: Callable[[_SubnetState, int], T]) -> T:
        """Apply ``change(state, head)`` to a copy of the head state and persist it."""
        with self._locked():
            self._refresh()
            head = self._head()
            state = copy.deepcopy(self._versions[-1][1])
            result = change(state, head)
            if self._versions[-1][0] == head:
                self._versions[-1] = (head, state)
            else:
                self._versions.append((head, state))
            keep_from = head - self.history_blocks
            while len(self._versions) > 1 and self._versions[1][0] <= keep_from:
                self._versions.pop(0)
            self._save()
            return result

    # Reads the simulated substrate needs -------------------------------------

    async def head(self) -> int:
        """The current block number."""
        self._refresh()
        return self._head()

    async def chain_info(self) -> dict[str, Any]:
        """``netuid``, ``genesis_hash``, ``block_time`` and ``manual_blocks``."""
        self._refresh()
        return {
            "netuid": self.netuid,
            "genesis_hash": self.genesis_hash,
            "block_time": self.block_time,
            "manual_blocks": self.manual_blocks,
        }

    async def storage(self, module: str, name: str, params: list[Any], block: int) -> Any:
        """One storage value at ``block``, decoded the way the SDK's transport decodes it."""
        self._refresh()
        state = self._state_at(block)
        return self._storage(state, block, module, name, list(params))

    async def storage_map(
        self, module: str, name: str, params: list[Any], block: int
    ) -> list[list[Any]]:
        """All ``[key, value]`` pairs of a storage map under the ``params`` prefix at ``block``."""
        self._refresh()
        state = self._state_at(block)
        return self._storage_map(state, block, module, name, list(params))

    async def runtime(self, api: str, method: str, params: list[Any], block: int) -> Any:
        """A runtime-API answer at ``block``."""
        self._refresh()
        state = self._state_at(block)
        if (api, method) == ("SubnetInfoRuntimeApi", "get_metagraph"):
            netuid = int(params[0])
            return self._metagraph(state, block) if netuid == self.netuid else None
        raise ChainError(f"the simulated chain does not implement the runtime API {api}.{method}")

    async def next_nonce(self, address: str) -> int:
        """The account's next transaction index."""
        self._refresh()
        return self._versions[-1][1].nonces.get(address, 0)

    async def submit(self, extrinsic: Mapping[str, Any]) -> Receipt:
        """Check and include a signed extrinsic in the head block.

        Raises ExtrinsicRejected when the pool would refuse it (signature, nonce, unknown
        call); a failing dispatch is included and reported in the receipt, as on chain.
        """
        unsigned = verified(extrinsic, self.genesis_hash)
        digest = extrinsic_hash(extrinsic)

        def apply(state: _SubnetState, head: int) -> Receipt:
            signer = unsigned["signer"]
            expected = state.nonces.get(signer, 0)
            if unsigned["nonce"] < expected:
                raise ExtrinsicRejected("Invalid Transaction: Transaction is outdated")
            if unsigned["nonce"] > expected:
                raise ExtrinsicRejected(
                    "Invalid Transaction: Transaction will be valid in the future"
                )
            call = unsigned["call"]
            handler = _CALLS.get((call["module"], call["function"]))
            if handler is None:
                raise ExtrinsicRejected(
                    f"the simulated chain does not implement {call['module']}.{call['function']}"
                )
            state.nonces[signer] = expected + 1
            block, count = state.extrinsics_in_block
            index = count if block == head else 0
            state.extrinsics_in_block = (head, index + 1)
            try:
                events = handler(self, state, head, signer, call["params"])
            except _DispatchError as error:
                return Receipt(
                    head, index, digest, False, error_name=error.name, error_message=error.docs
                )
            except (KeyError, TypeError, ValueError) as exc:
                # A node could not decode such a call: refused, the nonce stays unused.
                raise ExtrinsicRejected(
                    f"could not decode the call {call['module']}.{call['function']}: {exc!r}"
                ) from exc
            return Receipt(head, index, digest, True, events=tuple(events))

        return self._mutate(apply)

    # Control: what tests and dev tools change ----------------------------------

    async def register(
        self,
        hotkey: str,
        coldkey: str,
        *,
        stake: float = 0.0,
        validator_permit: bool = False,
    ) -> int:
        """Register ``hotkey`` and return its uid.

        While the subnet has room the hotkey gets the next uid; once it is full (it is
        created full) the chain prunes a neuron and the uid changes hands. The simulator
        has no emissions to score neurons by, so it prunes the non-validator with the
        least stake, the oldest registration first.
        """
        _check_ss58(hotkey, "hotkey")
        _check_ss58(coldkey, "coldkey")
        stake_rao = _stake_rao(stake)

        def change(state: _SubnetState, head: int) -> int:
            existing = state.uid_of(hotkey)
            if existing is not None:
                raise ValueError(f"hotkey: {hotkey} is already registered at uid {existing}")
            fresh = _Neuron(hotkey, coldkey, stake_rao, validator_permit, registered_at=head)
            if len(state.neurons) < self.max_uids:
                state.neurons.append(fresh)
                return len(state.neurons) - 1
            candidates = [u for u, n in enumerate(state.neurons) if not n.validator_permit]
            pool = candidates or list(range(len(state.neurons)))
            uid = min(
                pool,
                key=lambda u: (state.neurons[u].stake_rao, state.neurons[u].registered_at, u),
            )
            _put(state, uid, fresh)
            return uid

        return self._mutate(change)

    async def replace(
        self,
        uid: int,
        hotkey: str,
        coldkey: str,
        *,
        stake: float = 0.0,
        validator_permit: bool = False,
    ) -> None:
        """Give ``uid`` to a new hotkey, as when the chain prunes that neuron for a registration."""
        _check_ss58(hotkey, "hotkey")
        _check_ss58(coldkey, "coldkey")
        stake_rao = _stake_rao(stake)

        def change(state: _SubnetState, head: int) -> None:
            _check_uid(state, uid)
            existing = state.uid_of(hotkey)
            if existing is not None and existing != uid:
                raise ValueError(f"hotkey: {hotkey} is already registered at uid {existing}")
            _put(state, uid, _Neuron(hotkey, coldkey, stake_rao, validator_permit, head))

        self._mutate(change)

    async def set_neuron(
        self, uid: int, *, stake: float | None = None, validator_permit: bool | None = None
    ) -> None:
        """Change a neuron's stake (TAO) and/or validator permit."""
        stake_rao = None if stake is None else _stake_rao(stake)

        def change(state: _SubnetState, head: int) -> None:
            _check_uid(state, uid)
            neuron = state.neurons[uid]
            if stake_rao is not None:
                neuron.stake_rao = stake_rao
            if validator_permit is not None:
                neuron.validator_permit = validator_permit

        self._mutate(change)

    async def set_hyperparameters(self, **changes: int | bool) -> SubnetHyperparameters:
        """Change hyperparameters from the head block on; returns the new set.

        Names: tempo, weights_rate_limit, max_weight_limit, min_allowed_weights,
        commit_reveal, weights_version, reveal_period_epochs.
        """
        known = {f.name for f in dataclasses.fields(SubnetHyperparameters)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}")

        def change(state: _SubnetState, head: int) -> SubnetHyperparameters:
            updated = dataclasses.replace(state.hyperparameters, **cast(dict[str, Any], changes))
            updated.check()
            state.hyperparameters = updated
            return dataclasses.replace(updated)

        return self._mutate(change)

    async def advance(self, blocks: int = 1) -> int:
        """Produce ``blocks`` blocks now; returns the new head."""
        if blocks < 0:
            raise ValueError("blocks: must be >= 0")
        with self._locked():
            self._refresh()
            head = self._head() + blocks
            self._clock = (head, None if self.manual_blocks else time.time())
            self._save()
            return head

    async def pause(self) -> int:
        """Stop producing blocks until the file is opened again; returns the head."""
        with self._locked():
            self._refresh()
            head = self._head()
            self._clock = (head, None)
            self._save()
            return head

    async def weights_set(self, who: int | str, block: int | None = None) -> WeightsOnChain | None:
        """The weight row a validator (uid or hotkey) has on chain at ``block`` (the head)."""
        self._refresh()
        at = self._head() if block is None else block
        state = self._state_at(at)
        uid = who if isinstance(who, int) else state.uid_of(who)
        return None if uid is None else state.weights.get(uid)

    async def commits(self, who: int | str | None = None) -> tuple[WeightCommit, ...]:
        """Unrevealed weight commits at the head, of one validator (uid or hotkey) or all."""
        self._refresh()
        head = self._head()
        state = self._state_at(head)
        live = _live_commits(state, head, self.netuid)
        if who is None:
            return tuple(live)
        return tuple(c for c in live if who in (c.uid, c.hotkey))

    async def close(self) -> None:
        """Nothing to release: every write is already on disk."""

    # Storage items -------------------------------------------------------------

    def _storage(
        self, state: _SubnetState, block: int, module: str, name: str, params: list[Any]
    ) -> Any:
        if module == "SubtensorModule":
            if name in _PER_NETUID:
                if int(params[0]) != self.netuid:
                    return _DEFAULTS_FOR_MISSING_SUBNET.get(name)
                return self._per_netuid(state, block, name)
            if name == "Uids":
                return state.uid_of(str(params[1])) if int(params[0]) == self.netuid else None
            if name == "Keys":
                if int(params[0]) != self.netuid or not 0 <= int(params[1]) < len(state.neurons):
                    return None
                return state.neurons[int(params[1])].hotkey
            if name == "Owner":
                owners = {n.hotkey: n.coldkey for n in state.neurons}
                return owners.get(str(params[0]))
            if name == "LastUpdate":
                if int(params[0]) != self.netuid:
                    return []
                return [n.last_update for n in state.neurons]
            if name == "Weights":
                if int(params[0]) != self.netuid:
                    return []
                row = state.weights.get(int(params[1]))
                return [] if row is None else _row(row)
            if name == "TimelockedWeightCommits":
                if int(params[0]) != self.netuid:
                    return []
                return [
                    [c.hotkey, c.block, c.commit, c.reveal_round]
                    for c in _live_commits(state, block, self.netuid)
                    if c.epoch == int(params[1])
                ]
            if name == "TokenSymbol":
                return list(ALPHA.encode()) if int(params[0]) == self.netuid else None
        raise ChainError(f"the simulated chain has no storage item {module}.{name}")

    def _per_netuid(self, state: _SubnetState, block: int, name: str) -> Any:
        hyper = state.hyperparameters
        epoch, since = _epoch(block, self.netuid, hyper.tempo)
        values: dict[str, Any] = {
            "NetworksAdded": True,
            "Tempo": hyper.tempo,
            "WeightsSetRateLimit": hyper.weights_rate_limit,
            "MaxWeightsLimit": hyper.max_weight_limit,
            "MinAllowedWeights": hyper.min_allowed_weights,
            "CommitRevealWeightsEnabled": hyper.commit_reveal,
            "WeightsVersionKey": hyper.weights_version,
            "RevealPeriodEpochs": hyper.reveal_period_epochs,
            "SubnetEpochConsensus": "Yuma",
            "ValidatorPermit": [n.validator_permit for n in state.neurons],
            "SubnetworkN": len(state.neurons),
            "MaxAllowedUids": self.max_uids,
            "LastEpochBlock": max(0, block - since),
            "BlocksSinceLastStep": since,
            "SubnetEpochIndex": epoch,
            "PendingEpochAt": 0,
            "SubnetOwner": state.owner_coldkey,
            "SubnetOwnerHotkey": state.owner_hotkey,
            "NetworkRegisteredAt": 0,
        }
        return values[name]

    def _storage_map(
        self, state: _SubnetState, block: int, module: str, name: str, params: list[Any]
    ) -> list[list[Any]]:
        on_subnet = bool(params) and int(params[0]) == self.netuid
        if module == "Commitments" and name in {"CommitmentOf", "RevealedCommitments"}:
            return []
        if module == "SubtensorModule":
            if name == "Uids":
                return [[n.hotkey, uid] for uid, n in enumerate(state.neurons)] if on_subnet else []
            if name == "Keys":
                return [[uid, n.hotkey] for uid, n in enumerate(state.neurons)] if on_subnet else []
            if name == "Weights":
                if not on_subnet:
                    return []
                return [[uid, _row(row)] for uid, row in sorted(state.weights.items())]
            if name == "TimelockedWeightCommits":
                if not on_subnet:
                    return []
                by_epoch: dict[int, list[list[Any]]] = {}
                for c in _live_commits(state, block, self.netuid):
                    by_epoch.setdefault(c.epoch, []).append(
                        [c.hotkey, c.block, c.commit, c.reveal_round]
                    )
                return [[epoch, rows] for epoch, rows in sorted(by_epoch.items())]
            if name == "TokenSymbol" and not params:
                return [[self.netuid, list(ALPHA.encode())]]
            if name in _PER_NETUID and not params:
                return [[self.netuid, self._per_netuid(state, block, name)]]
        raise ChainError(f"the simulated chain has no storage map {module}.{name}")

    def _metagraph(self, state: _SubnetState, block: int) -> dict[str, Any]:
        hyper = state.hyperparameters
        _, since = _epoch(block, self.netuid, hyper.tempo)
        count = len(state.neurons)
        zeros = [0] * count
        return {
            "netuid": self.netuid,
            "name": list(b"platform local subnet"),
            "symbol": list(ALPHA.encode()),
            "block": block,
            "tempo": hyper.tempo,
            "last_step": max(0, block - since),
            "blocks_since_last_step": since,
            "owner_hotkey": state.owner_hotkey,
            "owner_coldkey": state.owner_coldkey,
            "network_registered_at": 0,
            "num_uids": count,
            "max_uids": self.max_uids,
            "hotkeys": [n.hotkey for n in state.neurons],
            "coldkeys": [n.coldkey for n in state.neurons],
            "active": [True] * count,
            "validator_permit": [n.validator_permit for n in state.neurons],
            "last_update": [n.last_update for n in state.neurons],
            "block_at_registration": [n.registered_at for n in state.neurons],
            "rank": zeros,
            "trust": zeros,
            "consensus": zeros,
            "incentives": zeros,
            "dividends": zeros,
            "pruning_score": zeros,
            "emission": zeros,
            "alpha_stake": [n.stake_rao for n in state.neurons],
            "tao_stake": zeros,
            "total_stake": [n.stake_rao for n in state.neurons],
            "axons": [None] * count,
            "identities": [None] * count,
            "tao_in": 0,
            "alpha_in": 0,
        }

    # Extrinsics ------------------------------------------------------------------

    def _weights_call_prelude(
        self, state: _SubnetState, head: int, signer: str, params: Mapping[str, Any]
    ) -> int:
        """Checks shared by the plain and the committed weight calls; returns the signer's uid."""
        if int(params["netuid"]) != self.netuid:
            raise _DispatchError("SubnetNotExists")
        if int(params.get("mecid", 0)) != 0:
            raise _DispatchError("MechanismDoesNotExist")
        uid = state.uid_of(signer)
        if uid is None:
            raise _DispatchError("HotKeyNotRegisteredInSubNet")
        return uid

    def _rate_limited(self, state: _SubnetState, uid: int, head: int) -> bool:
        last = state.neurons[uid].last_update
        limit = state.hyperparameters.weights_rate_limit
        return last != 0 and head - last < limit

    def _set_weights(
        self, state: _SubnetState, head: int, signer: str, params: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        uid = self._weights_call_prelude(state, head, signer, params)
        hyper = state.hyperparameters
        dests = [int(u) for u in params["dests"]]
        values = [int(v) for v in params["weights"]]
        if len(dests) != len(values):
            raise _DispatchError("WeightVecNotEqualSize")
        self_weight = dests == [uid]
        if not self_weight and not state.neurons[uid].validator_permit:
            raise _DispatchError("NeuronNoValidatorPermit")
        if hyper.weights_version and int(params["version_key"]) < hyper.weights_version:
            raise _DispatchError("IncorrectWeightVersionKey")
        if self._rate_limited(state, uid, head):
            raise _DispatchError("SettingWeightsTooFast")
        if hyper.commit_reveal:
            raise _DispatchError("CommitRevealEnabled")
        if len(set(dests)) != len(dests):
            raise _DispatchError("DuplicateUids")
        if any(not 0 <= d < len(state.neurons) for d in dests):
            raise _DispatchError("UidVecContainInvalidOne")
        if any(not 0 <= v <= U16_MAX for v in values + dests):
            # Not a u16: a node could not even decode the call.
            raise ExtrinsicRejected("could not decode the call: uids and weights must be u16")
        if not self_weight and len(dests) < hyper.min_allowed_weights:
            raise _DispatchError("WeightVecLengthIsLow")
        top = max(values, default=0)
        # The pallet max-upscales rows (the largest weight becomes 65535) and checks the
        # max weight limit on the upscaled row.
        stored = [v * U16_MAX // top if top else 0 for v in values]
        if not self_weight and not within_max_weight_limit(stored, hyper.max_weight_limit):
            raise _DispatchError("MaxWeightExceeded")
        pairs = sorted((d, v) for d, v in zip(dests, stored, strict=True) if v)
        state.weights[uid] = WeightsOnChain(
            uid=uid,
            block=head,
            uids=tuple(d for d, _ in pairs),
            values=tuple(v for _, v in pairs),
            version_key=int(params["version_key"]),
        )
        state.neurons[uid].last_update = head
        return [_event("WeightsSet", {"netuid": self.netuid, "uid": uid})]

    def _commit_weights(
        self, state: _SubnetState, head: int, signer: str, params: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        uid = self._weights_call_prelude(state, head, signer, params)
        hyper = state.hyperparameters
        if not hyper.commit_reveal:
            raise _DispatchError("CommitRevealDisabled")
        if self._rate_limited(state, uid, head):
            raise _DispatchError("CommittingWeightsTooFast")
        live = [c for c in _live_commits(state, head, self.netuid) if c.hotkey == signer]
        if len(live) >= MAX_UNREVEALED_COMMITS:
            raise _DispatchError("TooManyUnrevealedCommits")
        epoch, _ = _epoch(head, self.netuid, hyper.tempo)
        commit = WeightCommit(
            hotkey=signer,
            uid=uid,
            block=head,
            epoch=epoch,
            reveal_round=int(params["reveal_round"]),
            commit=str(params["commit"]),
            commit_reveal_version=int(params.get("commit_reveal_version", 0)),
        )
        # The chain cannot check the ciphertext until the reveal round; neither can we.
        state.commits = [*_live_commits(state, head, self.netuid), commit]
        state.neurons[uid].last_update = head
        return [
            _event(
                "TimelockedWeightsCommitted",
                {"who": signer, "netuid": self.netuid, "reveal_round": int(params["reveal_round"])},
            )
        ]


def _row(row: WeightsOnChain) -> list[list[int]]:
    """A Weights storage row: ``[[uid, value], ...]``."""
    return [[u, v] for u, v in zip(row.uids, row.values, strict=True)]


def _event(name: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {"event": {"module_id": "SubtensorModule", "event_id": name, "attributes": attributes}}


def _live_commits(state: _SubnetState, block: int, netuid: int) -> list[WeightCommit]:
    """Commits not yet past their reveal epoch (the chain reveals or drops them then)."""
    hyper = state.hyperparameters
    epoch, _ = _epoch(block, netuid, hyper.tempo)
    return [c for c in state.commits if c.epoch + hyper.reveal_period_epochs >= epoch]


def _put(state: _SubnetState, uid: int, neuron: _Neuron) -> None:
    """Hand ``uid`` to ``neuron``: the old holder's weights and commits go with it."""
    previous = state.neurons[uid].hotkey
    state.neurons[uid] = neuron
    state.weights.pop(uid, None)
    state.commits = [c for c in state.commits if c.hotkey != previous]


def _check_uid(state: _SubnetState, uid: int) -> None:
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < len(state.neurons):
        raise ValueError(f"uid: {uid!r} is not a uid of this subnet (0..{len(state.neurons) - 1})")


def _stake_rao(stake: float) -> int:
    if not math.isfinite(stake) or stake < 0:
        raise ValueError(f"stake: must be a finite number of TAO >= 0; got {stake!r}")
    return round(stake * RAO_PER_TAO)


def _check_timing(block_time: float, history_blocks: int) -> None:
    if not math.isfinite(block_time) or block_time <= 0:
        raise ValueError("block_time: must be a positive number of seconds")
    if history_blocks < 1:
        raise ValueError("history_blocks: must be at least 1")


_PER_NETUID = frozenset(
    {
        "NetworksAdded",
        "Tempo",
        "WeightsSetRateLimit",
        "MaxWeightsLimit",
        "MinAllowedWeights",
        "CommitRevealWeightsEnabled",
        "WeightsVersionKey",
        "RevealPeriodEpochs",
        "SubnetEpochConsensus",
        "ValidatorPermit",
        "SubnetworkN",
        "MaxAllowedUids",
        "LastEpochBlock",
        "BlocksSinceLastStep",
        "SubnetEpochIndex",
        "PendingEpochAt",
        "SubnetOwner",
        "SubnetOwnerHotkey",
        "NetworkRegisteredAt",
    }
)
# What the chain answers for a netuid that does not exist (the storage defaults).
_DEFAULTS_FOR_MISSING_SUBNET: dict[str, Any] = {"NetworksAdded": False, "ValidatorPermit": []}

_CALLS: dict[tuple[str, str], Any] = {
    ("SubtensorModule", "set_mechanism_weights"): LocalSubnet._set_weights,
    ("SubtensorModule", "set_weights"): LocalSubnet._set_weights,
    ("SubtensorModule", "commit_timelocked_mechanism_weights"): LocalSubnet._commit_weights,
    ("SubtensorModule", "commit_timelocked_weights"): LocalSubnet._commit_weights,
}
