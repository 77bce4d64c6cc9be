"""Where each challenge's shim listens.

Until a runtime places challenges itself, placement is static: a JSON file
``{"<slug>": "HOST:PORT", ...}`` named by ``--shim-endpoints-file``, re-read
whenever it changes, so challenges can be added without restarting the master.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from platform_common.config import ConfigError, parse_host_port

log = logging.getLogger(__name__)


class ShimDirectory(Protocol):
    async def addresses(self) -> Mapping[str, str]:
        """slug -> shim address HOST:PORT for every challenge that has a running instance."""
        ...


class NoShims:
    """No placement configured: every challenge is reported without an instance."""

    async def addresses(self) -> Mapping[str, str]:
        return {}


class ShimEndpointsFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._addresses: dict[str, str] = {}

    async def addresses(self) -> Mapping[str, str]:
        try:
            stat = self._path.stat()
        except OSError as exc:
            log.warning("shim endpoints file unreadable", extra={"error": str(exc)})
            return self._addresses
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                self._addresses = parse(self._path.read_text(encoding="utf-8"))
                self._stamp = stamp
            except (OSError, ValueError, ConfigError) as exc:
                # Keep the last good placement rather than failing every challenge.
                log.error("shim endpoints file rejected", extra={"error": str(exc)})
        return self._addresses


def parse(text: str) -> dict[str, str]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the shim endpoints file must hold a JSON object slug -> HOST:PORT")
    out = {}
    for slug, address in data.items():
        if not isinstance(address, str):
            raise ValueError(f"{slug}: the address must be a string HOST:PORT")
        parse_host_port(address, slug)
        out[str(slug)] = address
    return out
