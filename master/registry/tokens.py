"""Challenge tokens the master can present again without storing them.

The master authenticates to every challenge's shim with that challenge's token,
so it must be able to produce the clear value at each epoch; yet the database
keeps only a digest, so a copy of the database alone lets nobody impersonate
the master. A token is therefore derived, not drawn: ``HMAC-SHA256(key,
domain | slug | nonce)`` with a random 16-byte nonce per issue. The database
stores the nonce and the token's SHA-256; the key lives only in the master's
configuration (``--token-key-file``). Rotating a token draws a new nonce;
changing the key invalidates every token at once (all challenges must then be
rotated).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_PREFIX = "pct"  # noqa: S105 - a label, not a secret
NONCE_BYTES = 16
KEY_MIN_BYTES = 32
_DOMAIN = b"platform-network/challenge-token/v1\x00"


class TokenIssuer:
    """Derives challenge tokens from the master's token key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_MIN_BYTES:
            raise ValueError(f"the token key must be at least {KEY_MIN_BYTES} bytes")
        self._key = key

    def issue(self, slug: str) -> tuple[str, bytes]:
        """A new token for ``slug`` and the nonce to store with its digest."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return self.token(slug, nonce), nonce

    def token(self, slug: str, nonce: bytes) -> str:
        """The clear token issued for ``slug`` with ``nonce``."""
        mac = hmac.new(self._key, _DOMAIN + slug.encode() + b"\x00" + nonce, hashlib.sha256)
        return f"{TOKEN_PREFIX}_{base64.urlsafe_b64encode(mac.digest()).decode().rstrip('=')}"


def read_key_file(text: str) -> bytes:
    """Key bytes from a key file's text: hex, or any other text used as is (UTF-8)."""
    value = text.strip()
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = value.encode()
    if len(key) < KEY_MIN_BYTES:
        raise ValueError(
            f"the token key must be at least {KEY_MIN_BYTES} bytes "
            "(generate one with: python3 -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key
