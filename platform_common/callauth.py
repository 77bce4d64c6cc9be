"""Hotkey-signed gRPC calls: how validators authenticate to the master.

A validator signs every call with its hotkey (sr25519). The call metadata carries:

==========================  ==============================================================
``x-platform-hotkey``       the validator's SS58 hotkey
``x-platform-timestamp``    Unix time of signing, in nanoseconds (decimal)
``x-platform-nonce``        32 lowercase hex digits, random per call
``x-platform-body-sha256``  SHA-256 (hex) of the request message, serialized deterministically
``x-platform-signature``    ``0x`` + hex of the 64-byte signature of the payload below
==========================  ==============================================================

The signed payload is the UTF-8 of these lines joined by ``\\n``::

    platform-network/call/v1
    <full method, e.g. /platform_network.v1.Weights/WatchWeights>
    <timestamp>
    <nonce>
    <body sha256 hex>
    <hotkey>

The domain line keeps these signatures apart from every other use of the key (weight
vectors, signed HTTP requests). The master checks the signature, that the timestamp is
within its freshness window, that the nonce was not seen before for that hotkey inside
the window, that the body hash is the hash of the request it received, and that the
hotkey holds a validator permit on the subnet.

Pure: no I/O; the replay store and the metagraph are the server's business.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DOMAIN = "platform-network/call/v1"
HOTKEY = "x-platform-hotkey"
TIMESTAMP = "x-platform-timestamp"
NONCE = "x-platform-nonce"
BODY_SHA256 = "x-platform-body-sha256"
SIGNATURE = "x-platform-signature"
HEADERS = (HOTKEY, TIMESTAMP, NONCE, BODY_SHA256, SIGNATURE)

DEFAULT_MAX_AGE = 30.0
DEFAULT_ALLOWED_SKEW = 5.0

_NONCE = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"0x[0-9a-f]{128}")


class CallAuthError(Exception):
    """A signed call failed verification; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SignedCall:
    """What a verified call proved: who signed it, when, with which nonce, over which body."""

    hotkey: str
    timestamp_ns: int
    nonce: str
    body_sha256: str


def body_digest(request: Any) -> str:
    """SHA-256 hex of a request message's deterministic serialization."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def payload(method: str, timestamp_ns: int, nonce: str, body_sha256: str, hotkey: str) -> bytes:
    return "\n".join((DOMAIN, method, str(timestamp_ns), nonce, body_sha256, hotkey)).encode()


def sign_call(
    signer: Any, method: str, request: Any, *, now_ns: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates one call of ``method`` with ``request``.

    ``signer`` is a :class:`platform_common.keys.Signer` (anything with ``ss58_address``
    and ``sign(bytes) -> bytes``). Sign each call (and each reconnect of a stream) anew.
    """
    timestamp = time.time_ns() if now_ns is None else now_ns
    nonce = secrets.token_hex(16)
    body = body_digest(request)
    hotkey = str(signer.ss58_address)
    signature = signer.sign(payload(method, timestamp, nonce, body, hotkey))
    return (
        (HOTKEY, hotkey),
        (TIMESTAMP, str(timestamp)),
        (NONCE, nonce),
        (BODY_SHA256, body),
        (SIGNATURE, "0x" + bytes(signature).hex()),
    )


def is_signed(metadata: Iterable[tuple[str, Any]]) -> bool:
    """Whether the metadata attempts a signed call (has the signature entry)."""
    return any(key == SIGNATURE for key, _ in metadata)


def verify_call(
    metadata: Iterable[tuple[str, Any]],
    method: str,
    *,
    now_ns: int | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    allowed_skew: float = DEFAULT_ALLOWED_SKEW,
) -> SignedCall:
    """Check the signature and freshness of a call's metadata; raises CallAuthError.

    The body hash is only read here: the caller compares it with the request it
    receives (:func:`body_digest`), and checks replay and the validator permit.
    """
    values: dict[str, str] = {}
    for key, value in metadata:
        if key in HEADERS:
            if key in values:
                raise CallAuthError("malformed", f"{key} appears more than once")
            values[key] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    missing = [h for h in HEADERS if h not in values]
    if missing:
        raise CallAuthError("missing", "signed call metadata missing: " + ", ".join(missing))
    try:
        timestamp = int(values[TIMESTAMP])
    except ValueError:
        raise CallAuthError("malformed", f"{TIMESTAMP} is not a decimal integer") from None
    if not _NONCE.fullmatch(values[NONCE]):
        raise CallAuthError("malformed", f"{NONCE} must be 32 lowercase hex digits")
    if not _SHA256.fullmatch(values[BODY_SHA256]):
        raise CallAuthError("malformed", f"{BODY_SHA256} must be 64 lowercase hex digits")
    if not _SIGNATURE.fullmatch(values[SIGNATURE]):
        raise CallAuthError("malformed", f"{SIGNATURE} must be 0x and 128 lowercase hex digits")
    now = time.time_ns() if now_ns is None else now_ns
    if now - timestamp > max_age * 1e9:
        raise CallAuthError("stale", f"the call was signed more than {max_age:g} s ago")
    if timestamp - now > allowed_skew * 1e9:
        raise CallAuthError("stale", f"the call is signed more than {allowed_skew:g} s ahead")
    # Imported here: the SDK costs a second at import, and the call guard, which
    # imports this module for body_digest, runs in processes that never verify calls.
    from platform_common.keys import verify_signature

    hotkey = values[HOTKEY]
    message = payload(method, timestamp, values[NONCE], values[BODY_SHA256], hotkey)
    try:
        valid = verify_signature(hotkey, message, bytes.fromhex(values[SIGNATURE][2:]))
    except ValueError:
        raise CallAuthError("malformed", f"{HOTKEY} is not a valid SS58 address") from None
    if not valid:
        raise CallAuthError("bad_signature", "the signature does not verify for this hotkey")
    return SignedCall(hotkey, timestamp, values[NONCE], values[BODY_SHA256])
