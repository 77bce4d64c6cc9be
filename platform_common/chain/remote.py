"""Client of a simulated subnet served by ``platform chain`` (HTTP/JSON on loopback).

:class:`RemoteSubnet` answers exactly what :class:`~platform_common.chain.local.LocalSubnet`
answers, so components in other processes run the real SDK over the same subnet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from bittensor import ChainError, RpcConnectionError

from platform_common.chain.extrinsic import ExtrinsicRejected, Receipt
from platform_common.chain.local import SubnetHyperparameters, WeightCommit, WeightsOnChain

RPC_PATH = "/v1/rpc"
_ERRORS: dict[str, type[Exception]] = {
    "chain": ChainError,
    "invalid": ValueError,
    "rejected": ExtrinsicRejected,
}


class RemoteSubnet:
    """The simulated subnet behind ``platform chain`` at ``base_url`` (``http://HOST:PORT``)."""

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _call(self, rpc_method: str, /, **params: Any) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = self.base_url + RPC_PATH
        try:
            async with self._session.post(
                url, json={"method": rpc_method, "params": params}
            ) as reply:
                body = await reply.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RpcConnectionError(f"simulated chain at {self.base_url}: {exc!r}") from exc
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise RpcConnectionError(
                f"simulated chain at {self.base_url} answered HTTP {reply.status}: {body[:200]}"
            ) from exc
        error = document.get("error") if isinstance(document, dict) else None
        if error:
            raise _ERRORS.get(str(error.get("type")), ChainError)(str(error.get("message")))
        return document.get("result") if isinstance(document, dict) else None

    # Backend of the simulated substrate ----------------------------------------

    async def chain_info(self) -> dict[str, Any]:
        """``netuid``, ``genesis_hash``, ``block_time`` and ``manual_blocks``."""
        result: dict[str, Any] = await self._call("chain_info")
        return result

    async def head(self) -> int:
        """The current block number."""
        return int(await self._call("head"))

    async def storage(self, module: str, name: str, params: list[Any], block: int) -> Any:
        """One storage value at ``block``."""
        return await self._call("storage", module=module, name=name, params=params, block=block)

    async def storage_map(
        self, module: str, name: str, params: list[Any], block: int
    ) -> list[list[Any]]:
        """All ``[key, value]`` pairs of a storage map at ``block``."""
        rows: list[list[Any]] = await self._call(
            "storage_map", module=module, name=name, params=params, block=block
        )
        return rows

    async def runtime(self, api: str, method: str, params: list[Any], block: int) -> Any:
        """A runtime-API answer at ``block``."""
        return await self._call("runtime", api=api, method=method, params=params, block=block)

    async def next_nonce(self, address: str) -> int:
        """The account's next transaction index."""
        return int(await self._call("next_nonce", address=address))

    async def submit(self, extrinsic: Mapping[str, Any]) -> Receipt:
        """Have the served chain check and include a signed extrinsic."""
        return Receipt.from_json(await self._call("submit", extrinsic=dict(extrinsic)))

    # Control ---------------------------------------------------------------------

    async def register(
        self, hotkey: str, coldkey: str, *, stake: float = 0.0, validator_permit: bool = False
    ) -> int:
        """See :meth:`LocalSubnet.register`."""
        uid = await self._call(
            "register",
            hotkey=hotkey,
            coldkey=coldkey,
            stake=stake,
            validator_permit=validator_permit,
        )
        return int(uid)

    async def replace(
        self,
        uid: int,
        hotkey: str,
        coldkey: str,
        *,
        stake: float = 0.0,
        validator_permit: bool = False,
    ) -> None:
        """See :meth:`LocalSubnet.replace`."""
        await self._call(
            "replace",
            uid=uid,
            hotkey=hotkey,
            coldkey=coldkey,
            stake=stake,
            validator_permit=validator_permit,
        )

    async def set_neuron(
        self, uid: int, *, stake: float | None = None, validator_permit: bool | None = None
    ) -> None:
        """See :meth:`LocalSubnet.set_neuron`."""
        await self._call("set_neuron", uid=uid, stake=stake, validator_permit=validator_permit)

    async def set_hyperparameters(self, **changes: int | bool) -> SubnetHyperparameters:
        """See :meth:`LocalSubnet.set_hyperparameters`."""
        return SubnetHyperparameters(**await self._call("set_hyperparameters", changes=changes))

    async def advance(self, blocks: int = 1) -> int:
        """See :meth:`LocalSubnet.advance`."""
        return int(await self._call("advance", blocks=blocks))

    async def weights_set(self, who: int | str, block: int | None = None) -> WeightsOnChain | None:
        """See :meth:`LocalSubnet.weights_set`."""
        row = await self._call("weights_set", who=who, block=block)
        return None if row is None else WeightsOnChain.from_json(row)

    async def commits(self, who: int | str | None = None) -> tuple[WeightCommit, ...]:
        """See :meth:`LocalSubnet.commits`."""
        return tuple(WeightCommit.from_json(c) for c in await self._call("commits", who=who))

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
