"""Loopback ports for the processes a test or benchmark starts: the platform's own picker
(``platform_common.ports``), which chooses them where a bind to port 0 cannot take them first."""

from __future__ import annotations

from platform_common.ports import free_port

__all__ = ["free_port"]
