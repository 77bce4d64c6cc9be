"""SS58 addresses (format 42, 32-byte public keys): check, decode, encode.

An SS58 address is base58 over ``prefix || public key || checksum``, where the
checksum is the first two bytes of ``blake2b-512(b"SS58PRE" || prefix || key)``.
Bittensor hotkeys use the generic Substrate format 42, a single prefix byte, so a
valid hotkey is 35 bytes once decoded and 48 characters as text.

Pure and fast: a challenge answer may carry 65,536 hotkeys every epoch. Valid
addresses are remembered in a bounded cache (most hotkeys come back every
epoch), and a new address is first tried with the native SS58 codec that ships
with the Bittensor SDK (``bittensor_core``, about 2 us against 8 us for the
pure-Python decoder here): an address is valid exactly when it decodes and
re-encodes in format 42 to the same text. Only a refused address, or a machine
without that codec, goes through the pure-Python path, which also names the reason.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable

SS58_FORMAT = 42
PUBLIC_KEY_BYTES = 32
CHECKSUM_BYTES = 2
_PREFIX = b"SS58PRE"
_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_DIGIT = {ch: i for i, ch in enumerate(_ALPHABET)}
# Two base58 digits at a time halve the Python-level loop of the decoder.
_PAIR = {a + b: i * 58 + j for a, i in _DIGIT.items() for b, j in _DIGIT.items()}
# Longest text worth decoding: a two-byte-prefix address with a 32-byte key is 36
# bytes, at most 50 base58 digits. Anything longer is refused before the bignum work.
_MAX_TEXT = 50
_CACHE_LIMIT = 1 << 17
_valid_cache: dict[str, None] = {}


def _load_native() -> tuple[Callable[[str], bytes], Callable[[bytes, int], str]] | None:
    try:
        core = importlib.import_module("bittensor_core")
    except ImportError:  # pragma: no cover - bittensor depends on it
        return None
    return core.ss58_decode, core.ss58_encode


_native = _load_native()


def check(address: str) -> str | None:
    """``None`` when ``address`` is a valid format-42 SS58 address; else a short reason:
    "not base58", "wrong length", "address format N, expected 42", "reserved address
    prefix" or "bad checksum"."""
    if address in _valid_cache:
        return None
    reason = None if _native_valid(address) else _check_uncached(address)
    if reason is None:
        if len(_valid_cache) >= _CACHE_LIMIT:
            # Drop the oldest half: cheap, and the working set of one subnet is far smaller.
            for stale in list(_valid_cache)[: _CACHE_LIMIT // 2]:
                _valid_cache.pop(stale, None)
        _valid_cache[address] = None
    return reason


def is_valid(address: str) -> bool:
    """Whether ``address`` is a valid format-42 SS58 address."""
    return check(address) is None


def all_valid(addresses: Iterable[str]) -> bool:
    """Whether every address is a valid format-42 SS58 address.

    The addresses already known valid are set aside in one set operation (in C);
    only the others are checked one by one, and remembered when valid. An answer of
    256 hotkeys seen in earlier epochs costs a few microseconds instead of 256
    Python-level checks."""
    distinct = addresses if isinstance(addresses, set | frozenset) else set(addresses)
    return all(check(address) is None for address in distinct.difference(_valid_cache))


def decode(address: str) -> bytes:
    """The 32-byte public key of a valid format-42 address; ``ValueError`` otherwise."""
    reason = check(address)
    if reason is not None:
        raise ValueError(f"not a valid SS58 address ({reason}): {address!r}")
    raw = _b58decode(address)
    assert raw is not None  # checked above
    return raw[1 : 1 + PUBLIC_KEY_BYTES]


def encode(public_key: bytes, ss58_format: int = SS58_FORMAT) -> str:
    """The SS58 address of a 32-byte public key (single-byte formats 0..63)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes; got {len(public_key)}")
    if not 0 <= ss58_format < 64:
        raise ValueError(f"only single-byte SS58 formats 0..63 are supported; got {ss58_format}")
    body = bytes([ss58_format]) + public_key
    return _b58encode(body + _checksum(body))


def _native_valid(address: str) -> bool:
    if _native is None:  # pragma: no cover
        return False
    native_decode, native_encode = _native
    try:
        return native_encode(native_decode(address), SS58_FORMAT) == address
    except Exception:  # the codec refuses invalid text with ValueError
        return False


def _check_uncached(address: str) -> str | None:
    if len(address) > _MAX_TEXT:
        return "wrong length"
    raw = _b58decode(address)
    if raw is None:
        return "not base58"
    if len(raw) < 1 + CHECKSUM_BYTES:
        return "wrong length"
    first = raw[0]
    if first < 64:
        ss58_format, prefix_len = first, 1
    elif first < 128 and len(raw) >= 2:
        # Two-byte prefix: 14-bit format, as the SS58 specification lays it out.
        second = raw[1]
        ss58_format = ((first & 0x3F) << 2) | (second >> 6) | ((second & 0x3F) << 8)
        prefix_len = 2
    else:
        return "reserved address prefix"
    if len(raw) != prefix_len + PUBLIC_KEY_BYTES + CHECKSUM_BYTES:
        return "wrong length"
    if ss58_format != SS58_FORMAT:
        return f"address format {ss58_format}, expected {SS58_FORMAT}"
    body = raw[:-CHECKSUM_BYTES]
    if _checksum(body) != raw[-CHECKSUM_BYTES:]:
        return "bad checksum"
    return None


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(_PREFIX + body, digest_size=64).digest()[:CHECKSUM_BYTES]


def _b58decode(text: str) -> bytes | None:
    if not text:
        return None
    value = 0
    start = len(text) % 2
    try:
        if start:
            value = _DIGIT[text[0]]
        pair = _PAIR
        for i in range(start, len(text), 2):
            value = value * 3364 + pair[text[i : i + 2]]
    except KeyError:
        return None
    leading = len(text) - len(text.lstrip("1"))
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return b"\x00" * leading + body


def _b58encode(data: bytes) -> str:
    value = int.from_bytes(data, "big")
    digits: list[str] = []
    while value:
        value, rest = divmod(value, 58)
        digits.append(_ALPHABET[rest])
    leading = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading + "".join(reversed(digits))
