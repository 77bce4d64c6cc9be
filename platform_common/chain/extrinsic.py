"""Signed extrinsics of the simulated chain: encoding, signing, verification, receipts.

The simulated chain does not speak SCALE. A call travels as canonical JSON; the
signer's sr25519 key signs that encoding together with its account nonce and the
chain's genesis hash, so the chain (in this process or behind ``platform chain``)
checks the signature and the nonce as a node would, and never needs the private key.
The extrinsic hash is the blake2b-256 digest of the signed encoding, as on chain.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bittensor import Signer
from bittensor.sp_core import verify

HASH_PATTERN = re.compile(r"^0x[0-9a-f]{64}$")


class ExtrinsicRejected(Exception):
    """The chain refused an extrinsic before including it (bad signature, nonce, call)."""


def encode_value(value: Any) -> Any:
    """A call parameter as JSON: bytes become ``0x`` hex, tuples become lists."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [encode_value(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): encode_value(item) for key, item in value.items()}
    raise TypeError(f"cannot encode a {type(value).__name__} in a simulated extrinsic")


def encode_call(call: Any) -> dict[str, Any]:
    """``{"module", "function", "params"}`` from the SDK's composed ``Call`` (module, function,
    params)."""
    try:
        module, function, params = call
    except (TypeError, ValueError) as exc:
        raise ExtrinsicRejected(f"not a composed call: {call!r}") from exc
    if not isinstance(module, str) or not isinstance(function, str) or not isinstance(params, dict):
        raise ExtrinsicRejected(f"not a composed call: {call!r}")
    return {"module": module, "function": function, "params": encode_value(params)}


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _unsigned(extrinsic: Mapping[str, Any]) -> dict[str, Any]:
    return {key: extrinsic[key] for key in ("call", "signer", "nonce", "era", "genesis_hash")}


def encode_signed(extrinsic: Mapping[str, Any]) -> bytes:
    """The signed extrinsic's canonical encoding (what its hash is taken over)."""
    return _canonical(extrinsic)


def decode_signed(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_signed`."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ExtrinsicRejected(f"malformed extrinsic: {exc}") from exc
    if not isinstance(document, dict):
        raise ExtrinsicRejected("malformed extrinsic: not an object")
    return document


def extrinsic_hash(extrinsic: Mapping[str, Any]) -> str:
    """``0x`` + the blake2b-256 hex digest of the signed extrinsic's canonical encoding."""
    return "0x" + hashlib.blake2b(encode_signed(extrinsic), digest_size=32).hexdigest()


async def sign(
    call: Any, signer: Signer, *, nonce: int, era: int | None, genesis_hash: str
) -> dict[str, Any]:
    """A signed extrinsic for ``call``; ``signer.sign`` may be sync or async (remote signers)."""
    unsigned = {
        "call": encode_call(call),
        "signer": signer.ss58_address,
        "nonce": int(nonce),
        "era": era,
        "genesis_hash": genesis_hash,
    }
    signature: Any = signer.sign(_canonical(unsigned))
    if inspect.isawaitable(signature):
        signature = await signature
    return {**unsigned, "signature": "0x" + bytes(signature).hex()}


def verified(extrinsic: Mapping[str, Any], genesis_hash: str) -> dict[str, Any]:
    """The extrinsic's unsigned part once its shape, chain and signature check out."""
    try:
        unsigned = _unsigned(extrinsic)
        signature = bytes.fromhex(str(extrinsic["signature"]).removeprefix("0x"))
    except (KeyError, ValueError) as exc:
        raise ExtrinsicRejected(f"malformed extrinsic: {exc}") from exc
    call = unsigned["call"]
    if (
        not isinstance(call, dict)
        or not isinstance(call.get("module"), str)
        or not isinstance(call.get("function"), str)
        or not isinstance(call.get("params"), dict)
    ):
        raise ExtrinsicRejected("malformed extrinsic: call must be {module, function, params}")
    if not isinstance(unsigned["signer"], str) or not isinstance(unsigned["nonce"], int):
        raise ExtrinsicRejected("malformed extrinsic: signer must be SS58 and nonce an integer")
    if unsigned["genesis_hash"] != genesis_hash:
        raise ExtrinsicRejected("Invalid Transaction: signed for another chain (genesis hash)")
    try:
        valid = bool(verify(_canonical(unsigned), signature, unsigned["signer"]))
    except ValueError as exc:
        raise ExtrinsicRejected(f"Invalid Transaction: bad signer: {exc}") from exc
    if not valid:
        raise ExtrinsicRejected("Invalid Transaction: Transaction has a bad signature")
    return unsigned


@dataclass(frozen=True)
class Receipt:
    """What the chain did with an included extrinsic."""

    block: int
    index: int  # position in its block
    extrinsic_hash: str
    success: bool
    error_name: str = ""  # the pallet error on a failed dispatch, e.g. SettingWeightsTooFast
    error_message: str = ""
    events: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the wire form of ``platform chain``)."""
        return {
            "block": self.block,
            "index": self.index,
            "extrinsic_hash": self.extrinsic_hash,
            "success": self.success,
            "error_name": self.error_name,
            "error_message": self.error_message,
            "events": list(self.events),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Receipt:
        """Inverse of :meth:`to_json`."""
        return cls(
            block=int(data["block"]),
            index=int(data["index"]),
            extrinsic_hash=str(data["extrinsic_hash"]),
            success=bool(data["success"]),
            error_name=str(data.get("error_name") or ""),
            error_message=str(data.get("error_message") or ""),
            events=tuple(dict(event) for event in data.get("events") or ()),
        )
