"""Keeps the edge's configuration in step with the registry.

Every new registry revision, and every change of where a challenge's public
API listens, rebuilds the edge state, translates it and hands the resources to
the xDS server, which debounces, versions by content and pushes only what
changed. Nothing here talks to Envoy directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from master.edge import telemetry
from master.edge.model import EdgeLimits, EdgeResources, EdgeSettings, EdgeState
from master.edge.state import build_state
from master.edge.translate import translate
from master.edge.xds import XdsServer
from master.registry.feed import FeedClosed, RegistryFeed
from master.weights.endpoints import PublicDirectory

log = logging.getLogger(__name__)


class EdgeController:
    def __init__(
        self,
        feed: RegistryFeed,
        placement: PublicDirectory,
        xds: XdsServer,
        settings: EdgeSettings,
        defaults: EdgeLimits,
        *,
        placement_poll: float = 1.0,
    ) -> None:
        self._feed = feed
        self._placement = placement
        self._xds = xds
        self._settings = settings
        self._defaults = defaults
        self._placement_poll = placement_poll
        #: The translation step; a test may wrap it to force an invalid config.
        self.translate: Callable[[EdgeState], EdgeResources] = translate
        self.state: EdgeState | None = None

    async def start(self) -> None:
        """Build and publish the first configuration at once (no debounce)."""
        state = await self._build()
        self.state = state
        await self._xds.publish_now(self.translate(state))
        telemetry.XDS_SNAPSHOTS.inc()

    async def run_forever(self) -> None:
        revision = self._feed.revision
        while True:
            try:
                if await self._feed.wait_after(revision, self._placement_poll):
                    revision = self._feed.revision
                await self.refresh()
            except FeedClosed:
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A broken translation must not stop the loop: Envoy keeps the last
                # good config and the next change is tried again.
                log.exception("edge configuration not rebuilt; keeping the last one")
                await asyncio.sleep(self._placement_poll)

    async def refresh(self) -> None:
        state = await self._build()
        if state == self.state:
            return
        self.state = state
        self._xds.set_resources(self.translate(state))
        telemetry.XDS_SNAPSHOTS.inc()
        log.info(
            "edge configuration rebuilt",
            extra={
                "registry_revision": self._feed.revision,
                "routed": [c.slug for c in state.challenges],
            },
        )

    async def _build(self) -> EdgeState:
        challenges = self._feed.snapshot().challenges
        public = await self._placement.public_addresses()
        return build_state(challenges, public, self._settings, self._defaults)
