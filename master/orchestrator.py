"""The orchestrator: keeps what runs in line with the registry.

The registry says which challenges are ACTIVE and at which spec; a runtime
(:mod:`platform_common.runtime`) runs them. The orchestrator joins the two: on
every registry revision, and every ``poll`` seconds to notice instances that
crashed or failed, it asks the runtime to run each ACTIVE challenge at its
current spec (``ensure`` is idempotent) and to stop everything else. A spec
change or a token rotation changes the spec digest, so the runtime replaces the
instance. At start-up it first lets the runtime adopt what the previous master
left running, so a master restart does not restart every challenge.

The clear token of each challenge (the shim checks it) is re-derived from the
store only when the registry says it was (re-)issued, not on every pass.

:class:`RuntimePlacement` tells the epochs engine (shim addresses) and the edge
(public addresses) where the RUNNING instances are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime

from master.registry.feed import FeedClosed, RegistryFeed
from master.registry.rules import Challenge, Status
from platform_common.runtime import Instance, InstanceState, Runtime, RuntimeSpec

log = logging.getLogger(__name__)

#: slugs -> {slug: clear token}, e.g. ``RegistryStore.tokens_of``.
TokenSource = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]


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


class Orchestrator:
    def __init__(
        self,
        feed: RegistryFeed,
        runtime: Runtime,
        tokens: TokenSource,
        *,
        poll: float = 1.0,
    ) -> None:
        if not poll > 0:
            raise ValueError(f"poll: must be positive; got {poll}")
        self._feed = feed
        self._runtime = runtime
        self._tokens = tokens
        self._poll = poll
        self._revision = -1
        # slug -> (token issue time, clear token): re-read only after a rotation.
        self._token_cache: dict[str, tuple[datetime, str | None]] = {}
        self._seen: dict[str, tuple[InstanceState, int]] = {}
        self._complaints: dict[str, str] = {}
        self.placement = RuntimePlacement(runtime)

    @property
    def revision(self) -> int:
        """The registry revision of the last completed pass (-1 before the first)."""
        return self._revision

    async def start(self) -> None:
        """Adopt what a previous master left running (stopping the rest), then reconcile."""
        snapshot = self._feed.snapshot()
        active = [c.slug for c in snapshot.challenges if c.status is Status.ACTIVE]
        adopted = await self._runtime.adopt(active)
        log.info(
            "runtime adopted running challenges",
            extra={"adopted": [i.slug for i in adopted], "active": active},
        )
        await self.reconcile()

    async def run_forever(self) -> None:
        """Reconcile on every registry revision and every ``poll`` seconds, until the
        feed closes."""
        while True:
            try:
                await self._feed.wait_after(self._revision, self._poll)
            except FeedClosed:
                return
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The runtime keeps what runs; the next pass tries again.
                log.exception("reconciling the runtime with the registry failed; will retry")

    async def reconcile(self) -> None:
        """One pass: ACTIVE challenges ensured at their spec, every other instance stopped."""
        snapshot = self._feed.snapshot()
        active = {c.slug: c for c in snapshot.challenges if c.status is Status.ACTIVE}
        tokens = await self._tokens_for(active.values())
        for slug, challenge in active.items():
            token = tokens.get(slug)
            if token is None:
                self._complain(
                    slug,
                    "ACTIVE challenge has no token the master can present (issued under "
                    "another token key?); rotate its token to run it",
                )
                continue
            try:
                spec = runtime_spec(challenge, token)
            except ValueError as exc:
                self._complain(slug, f"cannot be run: {exc}")
                continue
            self._complaints.pop(slug, None)
            if slug not in self._seen:
                log.info(
                    "starting challenge: ACTIVE in the registry",
                    extra={"slug": slug, "image": spec.image, "revision": snapshot.revision},
                )
            await self._runtime.ensure(spec)
        statuses = {c.slug: c.status.name for c in snapshot.challenges}
        leftovers = [i.slug for i in await self._runtime.list() if i.slug not in active]
        for slug in leftovers:
            log.info(
                "stopping challenge: not ACTIVE in the registry",
                extra={
                    "slug": slug,
                    "status": statuses.get(slug, "DELETED"),
                    "revision": snapshot.revision,
                },
            )
        results = await asyncio.gather(
            *(self._runtime.stop(slug) for slug in leftovers), return_exceptions=True
        )
        for slug, result in zip(leftovers, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "challenge could not be stopped; will retry",
                    extra={"slug": slug, "error": repr(result)},
                )
        self._note(await self._runtime.list())
        for slug in list(self._token_cache):
            if slug not in active:
                del self._token_cache[slug]
        self._revision = snapshot.revision

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

    def _complain(self, slug: str, problem: str) -> None:
        """Log ``problem`` once (not on every pass)."""
        if self._complaints.get(slug) != problem:
            self._complaints[slug] = problem
            log.error("challenge not run", extra={"slug": slug, "error": problem})

    def _note(self, instances: Iterable[Instance]) -> None:
        """Log every state change of an instance, and every restart."""
        seen = {}
        for instance in instances:
            key = (instance.state, instance.restarts)
            seen[instance.slug] = key
            if self._seen.get(instance.slug) == key:
                continue
            extra = {
                "slug": instance.slug,
                "state": instance.state.value,
                "restarts": instance.restarts,
                "shim": instance.shim_address,
                "public": instance.public_address,
                "last_exit": instance.last_exit or None,
                "detail": instance.message or None,
            }
            if instance.state in (InstanceState.FAILED, InstanceState.BACKOFF):
                log.warning("challenge instance not running", extra=extra)
            else:
                log.info("challenge instance state", extra=extra)
        for slug in set(self._seen) - set(seen):
            log.info("challenge instance gone", extra={"slug": slug})
        self._seen = seen


class RuntimePlacement:
    """Where RUNNING instances listen: both the epochs engine's ``ShimDirectory`` and
    the edge's ``PublicDirectory`` (``master.weights.endpoints``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def addresses(self) -> Mapping[str, str]:
        """slug -> shim address HOST:PORT of every RUNNING instance."""
        return {
            i.slug: i.shim_address
            for i in await self._runtime.list()
            if i.state is InstanceState.RUNNING and i.shim_address
        }

    async def public_addresses(self) -> Mapping[str, str]:
        """slug -> public API address HOST:PORT of every RUNNING instance that has one."""
        return {
            i.slug: i.public_address
            for i in await self._runtime.list()
            if i.state is InstanceState.RUNNING and i.public_address
        }
