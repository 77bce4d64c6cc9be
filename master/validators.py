"""AUTH_POLICY_VALIDATOR: calls signed with a hotkey that holds a validator permit.

The scheme is :mod:`platform_common.callauth`. Here the master checks, in order: the
signature and freshness (``callauth.verify_call``), that the hotkey holds a validator
permit on the subnet (the metagraph, cached by :class:`RegisteredHotkeys`), and that
the nonce is new (claimed in the control-plane database, so master replicas agree).
The body hash is compared with the request by the call guard once the request has
been read (the authenticated :class:`~platform_common.rpc.Caller` carries it).

Operators keep access with the admin token: the call guard tries this check first
and the admin token second, and reports this check's refusal when both fail.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import grpc

from master.edge.authz import NONCE_RETENTION_MARGIN
from master.edge.hotkeys import ChainUnavailable, RegisteredHotkeys
from master.edge.nonces import NonceStore
from platform_common import callauth, rpc

log = logging.getLogger(__name__)

# Nonces are stored until the signature could no longer be fresh, plus the same clock
# margin as miners' nonces.
NONCE_MARGIN = timedelta(seconds=NONCE_RETENTION_MARGIN)


class ValidatorCalls:
    def __init__(
        self,
        hotkeys: RegisteredHotkeys,
        nonces: NonceStore,
        *,
        max_age: float = callauth.DEFAULT_MAX_AGE,
        allowed_skew: float = callauth.DEFAULT_ALLOWED_SKEW,
    ) -> None:
        self._hotkeys = hotkeys
        self._nonces = nonces
        self._max_age = max_age
        self._skew = allowed_skew

    async def __call__(self, method: str, metadata: rpc.Metadata) -> rpc.Caller:
        if not callauth.is_signed(metadata):
            raise rpc.Unauthenticated(
                "missing credentials: sign the call with a validator hotkey "
                "(x-platform-hotkey, -timestamp, -nonce, -body-sha256, -signature) "
                "or send 'authorization: Bearer <admin token>'",
                reason="missing",
            )
        try:
            call = callauth.verify_call(
                metadata, method, max_age=self._max_age, allowed_skew=self._skew
            )
        except callauth.CallAuthError as exc:
            raise rpc.Unauthenticated(str(exc), reason=exc.reason) from None
        await self._require_permit(call.hotkey)
        signed_at = datetime.fromtimestamp(call.timestamp_ns / 1e9, UTC)
        expire = signed_at + timedelta(seconds=self._max_age + self._skew) + NONCE_MARGIN
        # 63 random bits of the 128-bit nonce: the store keys on (hotkey, BIGINT).
        if not await self._nonces.claim(call.hotkey, int(call.nonce[:16], 16) >> 1, expire):
            raise rpc.Unauthenticated(
                "this nonce was already used by this hotkey: sign every call anew",
                reason="replayed",
            )
        return rpc.Caller("validator", call.hotkey, body_sha256=call.body_sha256)

    async def _require_permit(self, hotkey: str) -> None:
        try:
            uid = await self._hotkeys.lookup(hotkey)
        except ChainUnavailable:
            raise rpc.Unauthenticated(
                "the master cannot read the metagraph to check validator permits; retry later",
                code=grpc.StatusCode.UNAVAILABLE,
                reason="chain_unavailable",
            ) from None
        metagraph = self._hotkeys.metagraph
        neuron = metagraph.neuron(uid) if metagraph is not None and uid is not None else None
        if neuron is None or neuron.hotkey != hotkey or not neuron.validator_permit:
            raise rpc.Unauthenticated(
                f"hotkey {hotkey} holds no validator permit on this subnet",
                code=grpc.StatusCode.PERMISSION_DENIED,
                reason="no_permit",
            )
