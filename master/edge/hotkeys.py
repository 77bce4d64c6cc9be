"""Which hotkeys hold a uid on the subnet, as the edge needs to know per request.

Every signed miner request is checked against the subnet's metagraph, but a
chain read per request would make the chain the edge's bottleneck (and a
public path to hammer it). :class:`RegisteredHotkeys` keeps the last metagraph
and answers from memory:

- a hit never waits: when the cached metagraph is older than
  ``refresh_interval`` a refresh starts in the background and this answer
  still comes from the cached one (at most one refresh interval late, which is
  about one block on the real chain);
- a miss may be a miner that registered a moment ago, so it waits for a fresh
  metagraph, but at most once per ``miss_refresh_interval``: a flood of
  requests signed by unregistered keys cannot turn into a flood of chain reads;
- concurrent callers share the one refresh in flight;
- when a refresh fails the last good metagraph stays in use (and the failure is
  logged); only when none was ever loaded does :meth:`lookup` raise
  :class:`ChainUnavailable`, and then a new attempt is made at most once per
  ``miss_refresh_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from platform_common.chain.interface import Metagraph

log = logging.getLogger(__name__)


class MetagraphSource(Protocol):
    """What this module needs of a :class:`~platform_common.chain.interface.Chain`."""

    async def metagraph(self, block: int | None = None) -> Metagraph: ...


class ChainUnavailable(Exception):
    """No metagraph could be read from the chain yet, so no hotkey can be vouched for."""


class RegisteredHotkeys:
    """A cached hotkey -> uid view of the subnet; see the module docstring."""

    def __init__(
        self,
        chain: MetagraphSource,
        *,
        refresh_interval: float = 12.0,
        miss_refresh_interval: float = 2.0,
        refresh_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_interval < 0 or miss_refresh_interval < 0:
            raise ValueError("refresh intervals must be >= 0 seconds")
        if refresh_timeout <= 0:
            raise ValueError("refresh_timeout: must be > 0 seconds")
        self._chain = chain
        self._refresh_interval = refresh_interval
        self._miss_refresh_interval = miss_refresh_interval
        self._refresh_timeout = refresh_timeout
        self._clock = clock
        self._metagraph: Metagraph | None = None
        self._loaded_at = 0.0  # when the cached metagraph was read
        self._attempted_at: float | None = None  # when the last refresh started
        self._miss_refreshed_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def metagraph(self) -> Metagraph | None:
        """The cached metagraph (None before the first successful read)."""
        return self._metagraph

    async def lookup(self, hotkey: str) -> int | None:
        """The uid ``hotkey`` holds, or None when it is not registered.

        Raises :class:`ChainUnavailable` when no metagraph was ever loaded.
        """
        now = self._clock()
        graph = self._metagraph
        if graph is None:
            if self._refreshing is None and not self._due(
                self._attempted_at, self._miss_refresh_interval, now
            ):
                raise ChainUnavailable("the subnet's metagraph could not be read yet")
            graph = await self._refreshed()
            if graph is None:
                raise ChainUnavailable("the subnet's metagraph could not be read")
            self._miss_refreshed_at = now
            return graph.uid_of(hotkey)
        if now - self._loaded_at >= self._refresh_interval and self._due(
            self._attempted_at, self._refresh_interval, now
        ):
            self._start_refresh()
        uid = graph.uid_of(hotkey)
        if uid is not None:
            return uid
        if self._refreshing is None and not self._due(
            self._miss_refreshed_at, self._miss_refresh_interval, now
        ):
            return None
        self._miss_refreshed_at = now
        graph = await self._refreshed()
        return None if graph is None else graph.uid_of(hotkey)

    async def refresh(self) -> bool:
        """Read the metagraph now (e.g. at startup); whether a metagraph is loaded after it."""
        return await self._refreshed() is not None

    async def close(self) -> None:
        """Cancel a refresh in flight."""
        task, self._refreshing = self._refreshing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    def _due(last: float | None, interval: float, now: float) -> bool:
        return last is None or now - last >= interval

    def _start_refresh(self) -> asyncio.Task[None]:
        task = self._refreshing
        if task is None:
            self._attempted_at = self._clock()
            task = asyncio.get_running_loop().create_task(self._refresh())
            self._refreshing = task
        return task

    async def _refreshed(self) -> Metagraph | None:
        """Wait for a refresh (the one in flight, or a new one); the metagraph after it."""
        # Shielded: a caller giving up (Envoy's timeout cancels the RPC) must not
        # cancel the refresh other callers are waiting for.
        await asyncio.shield(self._start_refresh())
        return self._metagraph

    async def _refresh(self) -> None:
        started = self._clock()
        try:
            graph = await asyncio.wait_for(self._chain.metagraph(), self._refresh_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            cached = self._metagraph
            log.warning(
                "metagraph refresh failed",
                extra={
                    "error": repr(exc),
                    "cached_block": None if cached is None else cached.block,
                },
            )
        else:
            previous = self._metagraph
            self._metagraph = graph
            self._loaded_at = started
            if previous is None or previous.block != graph.block:
                log.debug(
                    "metagraph refreshed",
                    extra={"block": graph.block, "neurons": len(graph.neurons)},
                )
        finally:
            if self._refreshing is asyncio.current_task():
                self._refreshing = None
