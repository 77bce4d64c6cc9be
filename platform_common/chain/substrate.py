"""The Bittensor SDK's ``Substrate`` protocol over the local simulated subnet.

``bt.Client(network, substrate=SimulatedSubstrate(backend))`` runs the SDK's own code
(metagraph decoding, hyperparameter reads, ``SetWeights`` with its u16 conversion,
rate-limit preflight and commit-reveal encryption) against the simulated chain. The
backend is the subnet itself (:class:`~platform_common.chain.local.LocalSubnet`, in
this process) or its HTTP client (:class:`~platform_common.chain.remote.RemoteSubnet`,
for a subnet served by ``platform chain``); both answer the same questions.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from bittensor import Balance, ChainError, ExtrinsicResult, UnsignedExtrinsic

from platform_common.chain import extrinsic as ext
from platform_common.chain.extrinsic import ExtrinsicRejected, Receipt
from platform_common.chain.local import ALPHA

SIMULATED_SPEC_VERSION = 1


class SubnetBackend(Protocol):
    """What the simulated substrate asks of the simulated subnet (blocks by number)."""

    async def chain_info(self) -> dict[str, Any]: ...

    async def head(self) -> int: ...

    async def storage(self, module: str, name: str, params: list[Any], block: int) -> Any: ...

    async def storage_map(
        self, module: str, name: str, params: list[Any], block: int
    ) -> list[list[Any]]: ...

    async def runtime(self, api: str, method: str, params: list[Any], block: int) -> Any: ...

    async def next_nonce(self, address: str) -> int: ...

    async def submit(self, extrinsic: Mapping[str, Any]) -> Receipt: ...

    async def close(self) -> None: ...


def block_hash_of(genesis_hash: str, block: int) -> str:
    """A block's hash: a digest of (genesis, number) whose last 4 bytes carry the number.

    Carrying the number lets the chain map a hash back to its block without an index.
    """
    digest = hashlib.blake2b(f"{genesis_hash}/{block}".encode(), digest_size=28).hexdigest()
    return "0x" + digest + block.to_bytes(4, "big").hex()


def block_of_hash(genesis_hash: str, block_hash: str) -> int:
    """Inverse of :func:`block_hash_of`; ChainError for a hash of another chain."""
    text = block_hash.lower()
    if len(text) == 66 and text.startswith("0x"):
        try:
            block = int(text[-8:], 16)
        except ValueError:
            block = -1
        if block >= 0 and block_hash_of(genesis_hash, block) == text:
            return block
    raise ChainError(f"unknown block hash {block_hash}")


def _unsupported(what: str) -> ChainError:
    return ChainError(f"the simulated chain does not support {what}")


class SimulatedSubstrate:
    """An implementation of ``bittensor.Substrate`` backed by the simulated subnet."""

    def __init__(self, backend: SubnetBackend) -> None:
        self.backend = backend
        self.token_symbols: dict[int, str] = {}
        self._info: dict[str, Any] | None = None

    def balance(self, rao: int, netuid: int = 0) -> Balance:
        """A Balance tagged with this connection's token symbol."""
        return Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    # Lifecycle ----------------------------------------------------------------

    async def connect(self) -> None:
        """Read the chain's identity (genesis hash, block time); idempotent."""
        if self._info is None:
            self._info = await self.backend.chain_info()
            self.token_symbols = {int(self._info["netuid"]): ALPHA}

    async def close(self) -> None:
        """Close the backend (the HTTP session for a served subnet)."""
        await self.backend.close()

    async def _genesis(self) -> str:
        await self.connect()
        assert self._info is not None
        return str(self._info["genesis_hash"])

    async def _block(self, block_hash: str | None) -> int:
        if block_hash is None:
            return await self.backend.head()
        return block_of_hash(await self._genesis(), block_hash)

    # Reads --------------------------------------------------------------------

    async def block_hash(self, block: int | None = None) -> str:
        """The hash of ``block`` (the head when None)."""
        head = await self.backend.head()
        number = head if block is None else int(block)
        if not 0 <= number <= head:
            raise ChainError(f"block {number} has not been produced (the head is {head})")
        return block_hash_of(await self._genesis(), number)

    async def block_number(self) -> int:
        """The head block number."""
        return await self.backend.head()

    async def finalized_block_number(self) -> int:
        """The head: the simulated chain finalizes every block at once."""
        return await self.backend.head()

    async def block_time(self) -> float:
        """Seconds per block, as configured for the simulated chain."""
        await self.connect()
        assert self._info is not None
        return float(self._info["block_time"])

    async def spec_version(self) -> int:
        """A fixed runtime version."""
        return SIMULATED_SPEC_VERSION

    async def get_block(
        self, block_number: int | None = None, block_hash: str | None = None
    ) -> dict[str, Any] | None:
        """A header-only block (extrinsics are not recorded by the simulator)."""
        number = await self._block(block_hash) if block_number is None else block_number
        genesis = await self._genesis()
        if not 0 <= number <= await self.backend.head():
            return None
        parent = block_hash_of(genesis, number - 1) if number else "0x" + "00" * 32
        header = {"number": number, "hash": block_hash_of(genesis, number), "parentHash": parent}
        return {"header": header, "extrinsics": []}

    async def query(
        self,
        module: str,
        storage_function: str,
        params: list[Any] | None = None,
        block_hash: str | None = None,
    ) -> Any:
        """One storage value."""
        block = await self._block(block_hash)
        return await self.backend.storage(module, storage_function, list(params or []), block)

    async def map_has_entries(
        self,
        module: str,
        storage_function: str,
        params: list[Any],
        block_hash: str | None = None,
    ) -> bool:
        """Whether a storage map has any entry under ``params``."""
        return bool(await self.query_map(module, storage_function, params, block_hash))

    async def query_map(
        self,
        module: str,
        storage_function: str,
        params: list[Any] | None = None,
        block_hash: str | None = None,
    ) -> list[tuple[Any, Any]]:
        """A whole storage map as (key, value) pairs."""
        block = await self._block(block_hash)
        rows = await self.backend.storage_map(module, storage_function, list(params or []), block)
        return [(key, value) for key, value in rows]

    async def query_batch(
        self,
        module: str,
        storage_function: str,
        param_sets: list[list[Any]],
        block_hash: str | None = None,
    ) -> list[Any]:
        """One storage map for many keys, in ``param_sets`` order."""
        block = await self._block(block_hash)
        return [
            await self.backend.storage(module, storage_function, list(params), block)
            for params in param_sets
        ]

    async def runtime_call(
        self,
        api: str,
        method: str,
        params: list[Any],
        block_hash: str | None = None,
    ) -> Any:
        """A runtime-API call."""
        block = await self._block(block_hash)
        return await self.backend.runtime(api, method, list(params), block)

    async def constant(self, module: str, name: str) -> Any:
        """Pallet constants: only ``Aura.SlotDuration`` (the block time in ms)."""
        if (module, name) == ("Aura", "SlotDuration"):
            return round(await self.block_time() * 1000)
        raise _unsupported(f"the constant {module}.{name}")

    async def decode_scale(self, type_string: str, data: Any) -> Any:
        """Not available: the simulated chain does not speak SCALE."""
        raise _unsupported("SCALE decoding")

    async def blocks(self, *, finalized: bool = False) -> AsyncIterator[dict[str, Any]]:
        """New block headers as the head advances (polled at half the block time)."""
        seen = await self.backend.head()
        pause = max(0.01, await self.block_time() / 2)
        while True:
            await asyncio.sleep(pause)
            head = await self.backend.head()
            for number in range(seen + 1, head + 1):
                yield {"header": {"number": number}}
            seen = max(seen, head)

    async def events(self, block_hash: str | None = None) -> list[dict[str, Any]]:
        """Not recorded by the simulator: always empty."""
        return []

    # Calls and fees -----------------------------------------------------------

    async def compose(self, call: Any) -> Any:
        """The SDK's ``Call`` (module, function, params) is already what the simulator applies."""
        ext.encode_call(call)  # refuse what could not be submitted, at plan time
        return call

    async def estimate_fee(self, call: Any, keypair: Any) -> Balance:
        """The simulated chain charges no fees."""
        return Balance(0)

    async def estimate_weight(self, call: Any, keypair: Any) -> dict[str, int]:
        """No dispatch weights are simulated."""
        return {"ref_time": 0, "proof_size": 0}

    async def account_next_index(self, address: str) -> int:
        """The account's next nonce."""
        return await self.backend.next_nonce(address)

    # Writes -------------------------------------------------------------------

    async def mev_next_key(self) -> bytes | None:
        """No MEV shield on the simulated chain."""
        return None

    async def sign_extrinsic(
        self, call: Any, keypair: Any, *, nonce: int, period: int
    ) -> tuple[bytes, str]:
        """A signed extrinsic's encoding and hash, without submitting it."""
        signed = await ext.sign(
            call, keypair, nonce=nonce, era=period, genesis_hash=await self._genesis()
        )
        return ext.encode_signed(signed), ext.extrinsic_hash(signed)

    async def find_extrinsic(self, extrinsic_hash: str, block_hash: str) -> ExtrinsicResult | None:
        """Not recorded by the simulator."""
        return None

    async def prepare(
        self,
        call: Any,
        *,
        address: str,
        crypto_type: int = 1,
        nonce: int | None = None,
        period: int | None = None,
        tip: int = 0,
        metadata_hash: bytes | None = None,
    ) -> UnsignedExtrinsic:
        """Not available: out-of-process signing needs SCALE payloads."""
        raise _unsupported("out-of-process signing")

    async def submit_signature(
        self,
        unsigned: UnsignedExtrinsic,
        signature: bytes | str,
        *,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        """Not available: see :meth:`prepare`."""
        raise _unsupported("out-of-process signing")

    async def submit(
        self,
        call: Any,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = None,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        """Sign ``call`` with ``keypair`` and have the chain include it in the head block."""
        if nonce is None:
            nonce = await self.backend.next_nonce(keypair.ss58_address)
        try:
            signed = await ext.sign(
                call, keypair, nonce=nonce, era=period, genesis_hash=await self._genesis()
            )
        except ExtrinsicRejected as exc:
            return ExtrinsicResult(success=False, message=str(exc), error=ChainError(str(exc)))
        return await self._submit(signed)

    async def submit_signed(
        self,
        extrinsic: Any,
        keypair: Any,
        *,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        """Submit an extrinsic signed by :meth:`sign_extrinsic`."""
        if isinstance(extrinsic, bytes):
            return await self._submit(ext.decode_signed(extrinsic))
        raise _unsupported("extrinsics not signed by the simulated substrate")

    async def _submit(self, signed: Mapping[str, Any]) -> ExtrinsicResult:
        try:
            receipt = await self.backend.submit(signed)
        except ExtrinsicRejected as exc:
            # The pool refused it: nothing was included, as RpcSubstrate reports it.
            return ExtrinsicResult(success=False, message=str(exc), error=ChainError(str(exc)))
        block_hash = block_hash_of(await self._genesis(), receipt.block)
        common: dict[str, Any] = {
            "block_hash": block_hash,
            "extrinsic_id": f"{receipt.block}-{receipt.index:04d}",
            "data": {"extrinsic_hash": receipt.extrinsic_hash},
        }
        if receipt.success:
            return ExtrinsicResult(
                success=True,
                message="Success",
                fee=Balance(0),
                events=list(receipt.events),
                **common,
            )
        return ExtrinsicResult(
            success=False,
            message=receipt.error_message,
            error=ChainError(receipt.error_message, receipt.error_name),
            **common,
        )

    # Multisig -----------------------------------------------------------------

    def multisig_account(self, signatories: list[str], threshold: int) -> Any:
        """Not available on the simulated chain."""
        raise _unsupported("multisig accounts")

    async def submit_multisig(
        self,
        call: Any,
        keypair: Any,
        multisig_account: Any,
        *,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        """Not available on the simulated chain."""
        raise _unsupported("multisig accounts")
