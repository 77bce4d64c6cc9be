"""The :class:`~platform_common.chain.interface.Chain` on the Bittensor SDK, and ``open_chain``.

There is one implementation: :class:`SdkChain` drives ``bt.Client`` for every read and
write. What changes is the ``Substrate`` under the client: the SDK's websocket
``RpcSubstrate`` for a real network, or the simulated substrate for the local subnet
(in this process, or served by ``platform chain``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

import bittensor as bt
from bittensor import settings as bt_settings
from bittensor._transport.contract import SignedExtrinsic
from bittensor.intents.weights import SetWeights

from platform_common.chain.conversion import plan_chain_weights
from platform_common.chain.extrinsic import HASH_PATTERN, ExtrinsicRejected
from platform_common.chain.interface import (
    Chain,
    ChainWeights,
    Hyperparameters,
    Metagraph,
    Neuron,
    SubmitOutcome,
    SubmitResult,
    SubnetNotFoundError,
)
from platform_common.chain.local import GLOBAL_MAX_SUBNET_COUNT, LocalSubnet
from platform_common.chain.remote import RemoteSubnet
from platform_common.chain.substrate import SimulatedSubstrate

LOCAL_FILE = "local+file:"
LOCAL_HTTP = "local+http://"
_storage = bt.storage.SubtensorModule


class SdkChain:
    """A subnet read and written through ``bt.Client`` over any SDK ``Substrate``."""

    def __init__(self, network: str, substrate: bt.Substrate, netuid: int, *, url: str) -> None:
        self.netuid = netuid
        self.url = url
        self.substrate = substrate
        self.client = bt.Client(network, substrate=substrate)
        self._connected = False
        self._connecting = asyncio.Lock()

    async def _ready(self) -> bt.Client:
        # Connect the substrate only, not the client: Client.connect would also refresh a
        # display-only token-symbol cache in the user's home directory.
        async with self._connecting:
            if not self._connected:
                await self.substrate.connect()
                self._connected = True
        return self.client

    async def current_block(self) -> int:
        """The chain head's block number."""
        client = await self._ready()
        return await client.block()

    async def metagraph(self, block: int | None = None) -> Metagraph:
        """The subnet's neurons at ``block`` (the head when None), decoded by the SDK."""
        client = await self._ready()
        graph = await client.subnets.metagraph(self.netuid, block=block, commitments=False)
        if graph is None:
            raise SubnetNotFoundError(f"netuid {self.netuid} does not exist on {self.url}")
        neurons = tuple(
            Neuron(
                uid=n.uid,
                hotkey=n.hotkey,
                coldkey=n.coldkey,
                validator_permit=n.validator_permit,
                stake=n.total_stake.amount,
            )
            for n in graph.neurons
        )
        return Metagraph(netuid=self.netuid, block=graph.block, neurons=neurons)

    async def hyperparameters(self, block: int | None = None) -> Hyperparameters:
        """The weight-related hyperparameters at ``block``, read from the same storage items
        ``SetWeights`` reads."""
        client = await self._ready()
        view = await client.at(block)
        if not await view.query(_storage.NetworksAdded, [self.netuid]):
            raise SubnetNotFoundError(f"netuid {self.netuid} does not exist on {self.url}")
        netuid = [self.netuid]
        tempo, rate_limit, max_limit, min_allowed, commit_reveal, version = await asyncio.gather(
            view.query(_storage.Tempo, netuid),
            view.query(_storage.WeightsSetRateLimit, netuid),
            view.query(_storage.MaxWeightsLimit, netuid),
            view.query(_storage.MinAllowedWeights, netuid),
            view.query(_storage.CommitRevealWeightsEnabled, netuid),
            view.query(_storage.WeightsVersionKey, netuid),
        )
        return Hyperparameters(
            netuid=self.netuid,
            block=view.block,
            tempo=int(tempo),
            weights_rate_limit=int(rate_limit or 0),
            max_weight_limit=int(max_limit) if max_limit is not None else bt_settings.U16_MAX,
            min_allowed_weights=int(min_allowed or 0),
            commit_reveal_enabled=bool(commit_reveal),
            weights_version=int(version or 0),
        )

    def plan_weights(
        self, weights: Mapping[int, float], hyperparameters: Hyperparameters
    ) -> ChainWeights:
        """The u16 vector the SDK submits for ``weights`` (see :mod:`.conversion`)."""
        if hyperparameters.netuid != self.netuid:
            raise ValueError(
                f"hyperparameters: read for netuid {hyperparameters.netuid}, "
                f"this chain is netuid {self.netuid}"
            )
        return plan_chain_weights(weights, hyperparameters)

    async def set_weights(
        self, keypair: bt.Signer, weights: ChainWeights, *, mechanism_id: int = 0
    ) -> SubmitResult:
        """Submit ``weights`` with the SDK's ``SetWeights`` intent, signed by ``keypair``.

        The SDK checks registration and the rate limit before signing and picks the
        plaintext or the timelocked commit-reveal extrinsic from the subnet's settings.
        Never raises for a chain outcome: a refusal is RATE_LIMITED (with the first block
        a submission is allowed) or FAILED (with the SDK's or the chain's reason).
        """
        client = await self._ready()
        intent = SetWeights(
            netuid=self.netuid,
            uids=list(weights.uids),
            weights=[float(value) for value in weights.values],
            mechid=mechanism_id,
            version_key=weights.version_key,
        )
        try:
            result = await client.execute(intent, keypair)
        except bt.ChainError as error:
            if error.code == bt.ErrorCode.RATE_LIMITED:
                return await self._rate_limited(client, keypair, mechanism_id, error.message)
            return await self._failed(client, error.message, error.name)
        except (bt.BittensorError, ExtrinsicRejected) as error:
            return await self._failed(client, str(error), None)
        if not result.success:
            error_code = result.error.code if result.error is not None else None
            if error_code == bt.ErrorCode.RATE_LIMITED:
                return await self._rate_limited(client, keypair, mechanism_id, result.message)
            return await self._failed(
                client, result.message, result.error.name if result.error else None
            )
        block = _included_block(result) or await client.block()
        digest = str(result.data.get("extrinsic_hash") or "")
        digest = digest if HASH_PATTERN.match(digest) else ""
        count = len(weights.uids)
        if "reveal_round" in result.data:
            reveal_round = int(result.data["reveal_round"])
            return SubmitResult(
                outcome=SubmitOutcome.COMMITTED,
                block=block,
                extrinsic_hash=digest,
                message=f"timelock-encrypted commit of weights for {count} uids included in "
                f"block {block}; the chain reveals it at drand round {reveal_round}",
                reveal_round=reveal_round,
            )
        return SubmitResult(
            outcome=SubmitOutcome.SUBMITTED,
            block=block,
            extrinsic_hash=digest,
            message=f"weights for {count} uids included in block {block}",
        )

    async def _rate_limited(
        self, client: bt.Client, keypair: bt.Signer, mechanism_id: int, reason: str
    ) -> SubmitResult:
        index = mechanism_id * GLOBAL_MAX_SUBNET_COUNT + self.netuid
        try:
            view = await client.at()
            uid, limit, last_updates = await asyncio.gather(
                view.query(_storage.Uids, [self.netuid, keypair.ss58_address]),
                view.query(_storage.WeightsSetRateLimit, [self.netuid]),
                view.query(_storage.LastUpdate, [index]),
            )
        except bt.BittensorError as error:
            return await self._failed(client, f"{reason} (and then: {error})", None)
        last = 0
        if uid is not None and isinstance(last_updates, list | tuple) and uid < len(last_updates):
            last = int(last_updates[int(uid)])
        return SubmitResult(
            outcome=SubmitOutcome.RATE_LIMITED,
            block=view.block,
            extrinsic_hash="",
            message=reason,
            next_allowed_block=last + int(limit or 0),
        )

    async def _failed(self, client: bt.Client, message: str, name: str | None) -> SubmitResult:
        try:
            block = await client.block()
        except bt.BittensorError:
            block = 0
        return SubmitResult(
            outcome=SubmitOutcome.FAILED,
            block=block,
            extrinsic_hash="",
            message=f"{name}: {message}" if name else message,
        )

    async def close(self) -> None:
        """Close the connection (the websocket, or the simulated subnet's HTTP session)."""
        await self.substrate.close()
        self._connected = False


def _included_block(result: bt.ExtrinsicResult) -> int | None:
    height, _, _ = (result.extrinsic_id or "").partition("-")
    return int(height) if height.isdigit() else None


class _HashReportingRpcSubstrate(bt.RpcSubstrate):
    """The SDK's websocket substrate, also reporting the included extrinsic's hash."""

    async def _submit_and_report(
        self,
        extrinsic: SignedExtrinsic,
        *,
        signer_address: str,
        wait_for_inclusion: bool,
        wait_for_finalization: bool,
    ) -> bt.ExtrinsicResult:
        result = await super()._submit_and_report(
            extrinsic,
            signer_address=signer_address,
            wait_for_inclusion=wait_for_inclusion,
            wait_for_finalization=wait_for_finalization,
        )
        data = {**result.data, "extrinsic_hash": extrinsic.extrinsic_hash}
        return dataclasses.replace(result, data=data)


def open_chain(url: str, netuid: int) -> Chain:
    """The subnet ``netuid`` on the chain named by ``url``; connects on first use.

    ``url`` is one of:

    - ``local+file:PATH``: the simulated subnet whose state file is PATH (it must exist),
      in this process;
    - ``local+http://127.0.0.1:PORT``: the simulated subnet served by ``platform chain``;
    - ``finney``, ``test``, ``archive``, ``devnet``, ``local`` (a subtensor node at
      ws://127.0.0.1:9944) or a ``ws://`` / ``wss://`` endpoint: a real chain.
    """
    if url.startswith((LOCAL_FILE, LOCAL_HTTP)):
        return SdkChain("local", SimulatedSubstrate(open_local_subnet(url)), netuid, url=url)
    if url.startswith(("ws://", "wss://")) or url in bt_settings.NETWORKS:
        network, endpoint = bt_settings.resolve_endpoint(url)
        fallbacks = bt_settings.default_fallback_endpoints(network)
        substrate = _HashReportingRpcSubstrate(
            endpoint,
            fallback_endpoints=[u for u in fallbacks if u != endpoint],
            archive_endpoints=bt_settings.default_archive_endpoints(network),
        )
        return SdkChain(network, substrate, netuid, url=url)
    raise ValueError(
        f"chain url {url!r}: expected local+file:PATH, local+http://HOST:PORT, a network "
        f"name ({', '.join(sorted(bt_settings.NETWORKS))}) or a ws:// / wss:// endpoint"
    )


def open_local_subnet(url: str) -> LocalSubnet | RemoteSubnet:
    """The simulated subnet behind a ``local+file:`` or ``local+http://`` url, to inspect
    and change it (registrations, hyperparameters, blocks, stored weights)."""
    if url.startswith(LOCAL_FILE):
        path = url.removeprefix(LOCAL_FILE)
        if not path:
            raise ValueError("chain url local+file:PATH needs a path")
        return LocalSubnet.open(path)
    if url.startswith(LOCAL_HTTP):
        address = url.removeprefix(LOCAL_HTTP).rstrip("/")
        if not address:
            raise ValueError("chain url local+http://HOST:PORT needs an address")
        return RemoteSubnet("http://" + address)
    raise ValueError(
        f"chain url {url!r} is not a local simulated subnet (local+file: or local+http://)"
    )
