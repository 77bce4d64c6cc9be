"""Reconciliation: keep what a runtime runs in line with what is wanted.

Whoever decides what should run (the master's orchestrator from its registry, a
validator with ``--run-challenges`` from the registry it streams) describes it as a
:class:`Wanted`: the specs to run, the ACTIVE challenges it cannot run and why, at a
revision. The :class:`Reconciler` does the rest, the same way for both: at start-up
it lets the runtime adopt what a previous owner left running (stopping the rest);
then, on every new revision and every ``poll`` seconds (to notice instances that
crashed or failed), it asks the runtime to run each wanted spec (``ensure`` is
idempotent; a changed spec replaces the instance) and stops everything else. An
ACTIVE challenge that cannot be run is complained about once and left as it is: a
running instance of it is neither replaced nor stopped.

:class:`RuntimePlacement` tells callers where the RUNNING instances listen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from platform_common.runtime.interface import Instance, InstanceState, Runtime, RuntimeSpec

log = logging.getLogger(__name__)


class SourceClosed(Exception):
    """The source of wanted state is closed: reconciliation ends."""


@dataclass(frozen=True)
class Wanted:
    """What should run, as of ``revision``.

    ``specs``: the ACTIVE challenges to run, by slug. ``problems``: ACTIVE challenges
    that cannot be run, with the reason (left as they are). ``statuses``: the status of
    every challenge the source knows, for the logs of what is stopped and why.
    """

    revision: int
    specs: Mapping[str, RuntimeSpec] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)
    statuses: Mapping[str, str] = field(default_factory=dict)

    @property
    def active(self) -> set[str]:
        return set(self.specs) | set(self.problems)


class WantedSource(Protocol):
    async def wanted(self) -> Wanted:
        """What should run now."""
        ...

    async def wait_after(self, revision: int, within: float) -> None:
        """Return once the source is past ``revision``, or after ``within`` seconds;
        raise :class:`SourceClosed` once it will change no more."""
        ...


class Reconciler:
    """Keeps ``runtime`` in line with ``source``. ``observe``, if given, is called with
    the runtime's instances after every pass."""

    def __init__(
        self,
        source: WantedSource,
        runtime: Runtime,
        *,
        poll: float = 1.0,
        observe: Callable[[Sequence[Instance]], None] | None = None,
    ) -> None:
        if not poll > 0:
            raise ValueError(f"poll: must be positive; got {poll}")
        self._source = source
        self._runtime = runtime
        self._poll = poll
        self._observe = observe
        self._revision = -1
        self._seen: dict[str, tuple[InstanceState, int]] = {}
        self._complaints: dict[str, str] = {}
        self.placement = RuntimePlacement(runtime)

    @property
    def revision(self) -> int:
        """The revision of the last completed pass (-1 before the first)."""
        return self._revision

    async def start(self) -> None:
        """Adopt what a previous owner left running (stopping the rest), then reconcile."""
        wanted = await self._source.wanted()
        active = sorted(wanted.active)
        adopted = await self._runtime.adopt(active)
        log.info(
            "runtime adopted running challenges",
            extra={"adopted": [i.slug for i in adopted], "active": active},
        )
        await self.reconcile(wanted)

    async def run_forever(self) -> None:
        """Reconcile on every new revision and every ``poll`` seconds, until the source
        closes (or the task is cancelled)."""
        while True:
            try:
                await self._source.wait_after(self._revision, self._poll)
            except SourceClosed:
                return
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The runtime keeps what runs; the next pass tries again.
                log.exception("reconciling the runtime with the registry failed; will retry")

    async def reconcile(self, wanted: Wanted | None = None) -> None:
        """One pass: every wanted spec ensured, every instance not ACTIVE stopped."""
        if wanted is None:
            wanted = await self._source.wanted()
        for slug, problem in wanted.problems.items():
            self._complain(slug, problem)
        for slug, spec in wanted.specs.items():
            self._complaints.pop(slug, None)
            if slug not in self._seen:
                log.info(
                    "starting challenge: ACTIVE in the registry",
                    extra={"slug": slug, "image": spec.image, "revision": wanted.revision},
                )
            await self._runtime.ensure(spec)
        active = wanted.active
        for slug in [s for s in self._complaints if s not in active]:
            del self._complaints[slug]
        leftovers = [i.slug for i in await self._runtime.list() if i.slug not in active]
        for slug in leftovers:
            log.info(
                "stopping challenge: not ACTIVE in the registry",
                extra={
                    "slug": slug,
                    "status": wanted.statuses.get(slug, "DELETED"),
                    "revision": wanted.revision,
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
        instances = await self._runtime.list()
        self._note(instances)
        if self._observe is not None:
            self._observe(instances)
        self._revision = wanted.revision

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
    """Where RUNNING instances listen: the master's epochs engine (``ShimDirectory``)
    and edge (``PublicDirectory``) read it."""

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
