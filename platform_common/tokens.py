"""Bearer tokens: generation, hashing and constant-time checks.

Only SHA-256 digests of tokens are ever stored or kept in memory; the clear value
exists just long enough to hash it (and, for a newly issued token, to return it once).
Tokens are 256-bit random values, so an unsalted fast hash is sufficient: there is
nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

TOKEN_BYTES = 32


def new_token(prefix: str) -> str:
    """A fresh random token, e.g. ``pct_...``; the prefix makes leaked tokens recognisable."""
    return f"{prefix}_{secrets.token_urlsafe(TOKEN_BYTES)}"


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def matches(presented: str, expected_digest: bytes) -> bool:
    """Constant-time check of a presented token against a stored digest."""
    return hmac.compare_digest(digest(presented), expected_digest)


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def read_token_file(path: Path) -> str:
    """Read a token from a file (first line, surrounding whitespace removed)."""
    text = path.read_text(encoding="utf-8").strip()
    token = text.splitlines()[0].strip() if text else ""
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token
