"""``--run-challenges``: the registry's ACTIVE challenges run on the validator's host too.

The validator runs them the way the master's local runtime does (the same
:class:`~platform_common.runtime.local.LocalRuntime`, image map and shim, the same
:class:`~platform_common.runtime.reconcile.Reconciler`), driven by the copy of the
registry its ``WatchRegistry`` stream keeps in its store: a challenge turned ACTIVE
starts within seconds of the event, one turned INACTIVE or deleted stops, a spec change
replaces the instance, and after a restart the agent adopts what it left running.

What differs is the token. A shim admits only callers that present the challenge's
token; the master's instances get the registry token, which a validator never learns
(the registry keeps only a hash). So the validator gives each of its instances a token
of its own: 32 random bytes, minted the first time the challenge is wanted, kept in
``<runtime dir>/tokens.json`` (mode 0600) so the instance's spec digest survives an
agent restart and the running instance is adopted, not replaced. Only this host can
call its shims; the registry token never leaves the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterable
from pathlib import Path

from platform_common.files import write_atomically
from platform_common.runtime import Instance, InstanceState, RuntimeSpec
from platform_common.runtime.reconcile import Wanted
from platform_network.v1 import registry_pb2
from validator.store import Store

TOKENS_FILE = "tokens.json"
TOKENS_VERSION = 1
ACTIVE = registry_pb2.CHALLENGE_STATUS_ACTIVE


class TokenFileError(Exception):
    """The tokens file cannot be read or written."""


class InstanceTokens:
    """The token this validator gave each of its challenge instances, kept in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens: dict[str, str] = self._read()

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise TokenFileError(f"{self.path}: cannot read: {exc}") from exc
        try:
            data = json.loads(raw)
            if data.get("version") != TOKENS_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {TOKENS_VERSION}")
            tokens = data["tokens"]
            if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in tokens.items()):
                raise ValueError("tokens must map slugs to non-empty strings")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise TokenFileError(f"{self.path}: not a tokens file: {exc}") from exc
        return dict(tokens)

    def token(self, slug: str) -> str:
        """``slug``'s token, minted (and saved) the first time it is asked for."""
        token = self._tokens.get(slug)
        if token is None:
            token = secrets.token_urlsafe(32)
            self._tokens[slug] = token
            self._write()
        return token

    def keep_only(self, slugs: Iterable[str]) -> None:
        """Forget the tokens of every other slug (a challenge that comes back gets a new one)."""
        keep = set(slugs)
        if set(self._tokens) - keep:
            self._tokens = {s: t for s, t in self._tokens.items() if s in keep}
            self._write()

    def _write(self) -> None:
        body = json.dumps({"version": TOKENS_VERSION, "tokens": self._tokens}, sort_keys=True)
        try:
            write_atomically(self.path, body + "\n", private=True, durable=True)
        except OSError as exc:
            raise TokenFileError(f"{self.path}: cannot write: {exc}") from exc


class StreamedRegistry:
    """The validator's wanted state: the ACTIVE challenges of the registry copy in its
    store, each with the token this validator gave it. :meth:`changed` is called when a
    registry message has been applied."""

    def __init__(self, store: Store, tokens: InstanceTokens) -> None:
        self._store = store
        self._tokens = tokens
        self._changes = 0  # registry messages applied by the stream (bookmarks aside)
        self._changed = asyncio.Event()
        # (self._changes when read, store revision, challenges): the store is read
        # again only after the stream applied a change, not on every poll.
        self._read: tuple[int, int, list[registry_pb2.Challenge]] | None = None

    def changed(self) -> None:
        """The stream applied a snapshot or an event to the store."""
        self._changes += 1
        self._changed.set()

    def _stale(self) -> bool:
        return self._read is None or self._read[0] != self._changes

    async def wait_after(self, revision: int, within: float) -> None:
        if self._stale():
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)

    async def wanted(self) -> Wanted:
        read = self._read
        if read is None or self._stale():
            seen = self._changes
            cursor = await self._store.cursor("registry")
            read = (
                seen,
                cursor.revision if cursor is not None else 0,
                await self._store.challenges(),
            )
            self._read = read
        _, revision, challenges = read
        specs: dict[str, RuntimeSpec] = {}
        problems: dict[str, str] = {}
        active = [c for c in challenges if c.status == ACTIVE]
        # Tokens of challenges no longer ACTIVE are forgotten before new ones are minted.
        self._tokens.keep_only(c.slug for c in active)
        for challenge in active:
            try:
                specs[challenge.slug] = RuntimeSpec(
                    slug=challenge.slug,
                    image=challenge.image,
                    env=dict(challenge.env),
                    token=self._tokens.token(challenge.slug),
                    public_port=challenge.routes.public_port,
                )
            except ValueError as exc:
                problems[challenge.slug] = f"cannot be run: {exc}"
        return Wanted(
            revision=revision,
            specs=specs,
            problems=problems,
            statuses={
                c.slug: registry_pb2.ChallengeStatus.Name(c.status).removeprefix(
                    "CHALLENGE_STATUS_"
                )
                for c in challenges
            },
        )


def describe(instances: Iterable[Instance]) -> dict[str, dict[str, object]]:
    """What ``/healthz`` says of each instance."""
    return {
        i.slug: {
            "state": i.state.value,
            "restarts": i.restarts,
            **({"detail": i.message} if i.message else {}),
            **({"last_exit": i.last_exit} if i.last_exit else {}),
        }
        for i in instances
    }


def count_states(instances: Iterable[Instance]) -> dict[str, int]:
    """Instances by state, every state present (for the gauge)."""
    counts = {state.value: 0 for state in InstanceState if state is not InstanceState.STOPPED}
    for instance in instances:
        counts[instance.state.value] = counts.get(instance.state.value, 0) + 1
    return counts
