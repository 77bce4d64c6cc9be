"""The runtime interface: how a component asks for challenges to run.

Deciding *what* runs and *how* it runs are separate jobs. The master's orchestrator
(and a validator started with ``--run-challenges``) reads the registry and decides
which challenges should run, at which spec; a runtime makes it so: the local
runtime with supervised processes on this machine, later Kubernetes with a
Deployment per challenge. Both sides meet here, in the shared package, so the
validator can use a runtime without importing the master.

The interface is declarative and idempotent: ``ensure(spec)`` says "this challenge
should run like this" and may be called again and again with the same spec; a
different spec (image, environment, public port or token) replaces the instance.
Every spec carries a digest so a runtime can tell, after its owner restarts, whether
what still runs is what is wanted, without ever storing the token itself.
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

SLUG_MAX = 40
_SLUG_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class InstanceState(enum.Enum):
    """Where an instance (a challenge and its shim) is in its life."""

    STARTING = "STARTING"  # processes or pods are being started; not ready yet
    RUNNING = "RUNNING"  # the challenge and its shim are ready; placement reports them
    BACKOFF = "BACKOFF"  # it exited or failed to start; waiting before the next attempt
    STOPPING = "STOPPING"  # being stopped (or replaced after a spec change)
    STOPPED = "STOPPED"  # stopped on request; the final state ``stop`` reports
    FAILED = "FAILED"  # cannot run as specified (e.g. unknown image); not retried until
    # the spec changes


@dataclass(frozen=True)
class RuntimeSpec:
    """How one challenge should run.

    ``token`` is the challenge's token from the registry. It is a secret: it never
    appears in ``repr``, logs or files; runtimes hand it to the processes through
    their environment only. ``digest()`` covers a hash of it, so rotating the token
    replaces the instance.
    """

    slug: str
    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    public_port: int = 0

    def __post_init__(self) -> None:
        if len(self.slug) > SLUG_MAX or not _SLUG_RE.fullmatch(self.slug):
            raise ValueError(
                "slug: lowercase letters, digits and '-', starting with a letter, not ending "
                f"with '-', at most {SLUG_MAX} characters; got {self.slug!r}"
            )
        if not self.image:
            raise ValueError(f"{self.slug}: image is required")
        if not self.token:
            raise ValueError(f"{self.slug}: token is required (the challenge's registry token)")
        if not 0 <= self.public_port <= 65535:
            raise ValueError(f"{self.slug}: public_port must be 0..65535; got {self.public_port}")
        # A read-only copy: the spec is a value, its digest must not drift.
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))

    def digest(self) -> str:
        """SHA-256 over everything that defines the instance; the token enters only
        through its own SHA-256, so the digest can be stored and logged."""
        body = {
            "slug": self.slug,
            "image": self.image,
            "env": dict(sorted(self.env.items())),
            "public_port": self.public_port,
            "token_sha256": hashlib.sha256(self.token.encode()).hexdigest(),
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Instance:
    """A runtime's view of one challenge at one moment (a snapshot, never updated).

    ``digest`` is the spec digest of what runs (or is being started); ``pids`` maps
    a role ("challenge", "shim") to its process id where the runtime has processes;
    ``last_exit`` says how the previous run ended; ``message`` explains the current
    state (why it FAILED, how long BACKOFF lasts); ``since`` is when it entered it.
    """

    slug: str
    digest: str
    state: InstanceState
    image: str = ""
    shim_address: str | None = None
    public_address: str | None = None
    pids: Mapping[str, int] = field(default_factory=dict)
    restarts: int = 0
    last_exit: str = ""
    message: str = ""
    since: datetime = field(default_factory=utcnow)


class RuntimeBusy(Exception):
    """Another runtime owns the same state (e.g. a second master on one state directory)."""


class Runtime(Protocol):
    """What the orchestrator needs from a runtime. Every method is safe to call again."""

    async def ensure(self, spec: RuntimeSpec) -> Instance:
        """Make ``spec.slug`` run at ``spec``; return at once with the instance's state.

        Idempotent: the same spec again changes nothing. A spec with another digest
        replaces the running instance (stopped gracefully, then started anew).
        """
        ...

    async def stop(self, slug: str) -> Instance | None:
        """Stop ``slug`` gracefully (SIGTERM, a grace period, then SIGKILL) and forget it.

        Returns the final snapshot (STOPPED), or None if nothing ran for ``slug``.
        """
        ...

    async def status(self, slug: str) -> Instance | None:
        """The instance of ``slug``, or None if the runtime runs nothing for it."""
        ...

    async def list(self) -> builtins.list[Instance]:
        """Every instance the runtime runs (in every state but STOPPED), by slug."""
        ...

    async def adopt(self, desired: Iterable[str]) -> builtins.list[Instance]:
        """The start-up step after the owner restarted: take over the instances left
        running for the ``desired`` slugs, stop every other one (orphans). Returns
        the adopted instances. Call it once, before the first ``ensure``; ``ensure``
        then replaces an adopted instance whose spec digest differs."""
        ...

    async def close(self, *, stop_instances: bool = True) -> None:
        """Release the runtime. ``stop_instances=False`` leaves the instances running
        for the next owner to adopt."""
        ...
