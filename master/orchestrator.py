"""The orchestrator: keeps what runs in line with the master's registry.

The registry says which challenges are ACTIVE and at which spec; a runtime
(:mod:`platform_common.runtime`) runs them; the shared
:class:`~platform_common.runtime.reconcile.Reconciler` joins the two (adoption at
start-up, a pass on every registry revision and every ``poll`` seconds). This module
says what the master wants run: each ACTIVE challenge at its registry spec with its
clear token, so a spec change or a token rotation changes the spec digest and the
runtime replaces the instance.

The clear token of each challenge (the shim checks it) is re-derived from the store
only when the registry says it was (re-)issued, not on every pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime

from master.registry.feed import FeedClosed, RegistryFeed
from master.registry.rules import Challenge, Status
from platform_common.runtime import Runtime, RuntimeSpec
from platform_common.runtime.reconcile import Reconciler, RuntimePlacement, SourceClosed, Wanted

__all__ = ["Orchestrator", "RegistryWanted", "RuntimePlacement", "runtime_spec"]

#: slugs -> {slug: clear token}, e.g. ``RegistryStore.tokens_of``.
TokenSource = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]

UNDERIVABLE = (
    "ACTIVE challenge has no token the master can present (issued under another token "
    "key?); rotate its token to run it"
)


def runtime_spec(challenge: Challenge, token: str) -> RuntimeSpec:
    """How ``challenge`` should run, with its clear ``token``."""
    spec = challenge.spec
    return RuntimeSpec(
        slug=spec.slug,
        image=spec.image,
        env=dict(spec.env),
        token=token,
        public_port=spec.routes.public_port,
    )


class RegistryWanted:
    """The master's wanted state: its registry feed's ACTIVE challenges."""

    def __init__(self, feed: RegistryFeed, tokens: TokenSource) -> None:
        self._feed = feed
        self._tokens = tokens
        # slug -> (token issue time, clear token): re-read only after a rotation.
        self._token_cache: dict[str, tuple[datetime, str | None]] = {}

    async def wait_after(self, revision: int, within: float) -> None:
        try:
            await self._feed.wait_after(revision, within)
        except FeedClosed:
            raise SourceClosed from None

    async def wanted(self) -> Wanted:
        snapshot = self._feed.snapshot()
        active = {c.slug: c for c in snapshot.challenges if c.status is Status.ACTIVE}
        tokens = await self._tokens_for(active.values())
        specs: dict[str, RuntimeSpec] = {}
        problems: dict[str, str] = {}
        for slug, challenge in active.items():
            token = tokens.get(slug)
            if token is None:
                problems[slug] = UNDERIVABLE
                continue
            try:
                specs[slug] = runtime_spec(challenge, token)
            except ValueError as exc:
                problems[slug] = f"cannot be run: {exc}"
        for slug in list(self._token_cache):
            if slug not in active:
                del self._token_cache[slug]
        return Wanted(
            revision=snapshot.revision,
            specs=specs,
            problems=problems,
            statuses={c.slug: c.status.name for c in snapshot.challenges},
        )

    async def _tokens_for(self, challenges: Iterable[Challenge]) -> dict[str, str]:
        challenges = list(challenges)
        stale = [
            c.slug
            for c in challenges
            if (cached := self._token_cache.get(c.slug)) is None or cached[0] != c.token_issue_time
        ]
        fresh = await self._tokens(stale) if stale else {}
        for challenge in challenges:
            if challenge.slug in stale:
                # None too: a token the store cannot derive is not asked for again
                # until the challenge's token is issued anew.
                token = fresh.get(challenge.slug)
                self._token_cache[challenge.slug] = (challenge.token_issue_time, token)
        return {
            c.slug: token
            for c in challenges
            if (token := self._token_cache.get(c.slug, (None, None))[1]) is not None
        }


class Orchestrator(Reconciler):
    """The master's reconciler: ``feed``'s ACTIVE challenges run on ``runtime``."""

    def __init__(
        self,
        feed: RegistryFeed,
        runtime: Runtime,
        tokens: TokenSource,
        *,
        poll: float = 1.0,
    ) -> None:
        super().__init__(RegistryWanted(feed, tokens), runtime, poll=poll)
