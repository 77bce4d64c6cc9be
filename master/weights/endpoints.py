"""Where each challenge's shim and public API listen.

Until a runtime places challenges itself, placement is static: a JSON file
named by ``--shim-endpoints-file``, re-read whenever it changes, so challenges
can be added without restarting the master. Each entry is either the shim's
address, or an object giving the shim's and the public API's addresses::

    {"alpha": "127.0.0.1:7001",
     "beta": {"shim": "127.0.0.1:7002", "public": "127.0.0.1:8002"}}

The epochs engine reads the shims; the edge reads the public addresses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from platform_common.config import ConfigError, parse_host_port

log = logging.getLogger(__name__)


class ShimDirectory(Protocol):
    async def addresses(self) -> Mapping[str, str]:
        """slug -> shim address HOST:PORT for every challenge that has a running instance."""
        ...


class PublicDirectory(Protocol):
    async def public_addresses(self) -> Mapping[str, str]:
        """slug -> address HOST:PORT of the challenge's public API, where one is known."""
        ...


class NoShims:
    """No placement configured: every challenge is reported without an instance."""

    async def addresses(self) -> Mapping[str, str]:
        return {}

    async def public_addresses(self) -> Mapping[str, str]:
        return {}


@dataclass(frozen=True)
class Placement:
    shim: str | None = None
    public: str | None = None


class ShimEndpointsFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._placements: dict[str, Placement] = {}

    async def addresses(self) -> Mapping[str, str]:
        return {slug: p.shim for slug, p in self._read().items() if p.shim}

    async def public_addresses(self) -> Mapping[str, str]:
        return {slug: p.public for slug, p in self._read().items() if p.public}

    def _read(self) -> Mapping[str, Placement]:
        try:
            stat = self._path.stat()
        except OSError as exc:
            log.warning("shim endpoints file unreadable", extra={"error": str(exc)})
            return self._placements
        # The inode too: a ConfigMap update swaps in a new file, maybe of the same size
        # within the same clock tick.
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                self._placements = parse(self._path.read_text(encoding="utf-8"))
                self._stamp = stamp
            except (OSError, ValueError, ConfigError) as exc:
                # Keep the last good placement rather than failing every challenge.
                log.error("shim endpoints file rejected", extra={"error": str(exc)})
        return self._placements


def parse(text: str) -> dict[str, Placement]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(
            'the shim endpoints file must hold a JSON object slug -> "HOST:PORT" '
            'or slug -> {"shim": "HOST:PORT", "public": "HOST:PORT"}'
        )
    out = {}
    for slug, entry in data.items():
        if isinstance(entry, str):
            parse_host_port(entry, slug)
            out[str(slug)] = Placement(shim=entry)
        elif isinstance(entry, dict) and entry and set(entry) <= {"shim", "public"}:
            for key, address in entry.items():
                if not isinstance(address, str):
                    raise ValueError(f"{slug}.{key}: the address must be a string HOST:PORT")
                parse_host_port(address, f"{slug}.{key}")
            out[str(slug)] = Placement(shim=entry.get("shim"), public=entry.get("public"))
        else:
            raise ValueError(
                f'{slug}: expected "HOST:PORT" or an object with "shim" and/or "public" addresses'
            )
    return out
