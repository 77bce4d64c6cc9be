"""The challenge token as a :class:`platform_common.rpc.CallGuard` authenticator.

The master presents a challenge's token (issued by the registry) as metadata
``authorization: Bearer <challenge token>`` on every ChallengeInternal call
(``AUTH_POLICY_MASTER``). Only the token's SHA-256 digest is kept; the presented
value is compared in constant time.
"""

from __future__ import annotations

from platform_common import tokens
from platform_common.rpc import Caller, Metadata, Unauthenticated

MISSING = "missing credentials: send metadata 'authorization: Bearer <challenge token>'"
INVALID = "invalid challenge token"


class ChallengeToken:
    """Accepts calls that present one challenge's token."""

    def __init__(self, token: str, subject: str = "") -> None:
        if not token or token != token.strip() or any(ch.isspace() for ch in token):
            raise ValueError("the challenge token must be non-empty and contain no whitespace")
        self._digest = tokens.digest(token)
        self._subject = subject

    def matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is the token (constant time)."""
        return presented is not None and tokens.matches(presented, self._digest)

    async def __call__(self, method: str, metadata: Metadata) -> Caller:
        presented = tokens.bearer(metadata)
        if presented is None:
            raise Unauthenticated(MISSING, reason="missing")
        if not tokens.matches(presented, self._digest):
            raise Unauthenticated(INVALID, reason="invalid_token")
        return Caller("master", self._subject)
