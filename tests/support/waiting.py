"""Waiting for something to become true in a test, bounded in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str = "condition",
    within: float = 30.0,
    *,
    poll: float = 0.05,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that; fail after
    ``within`` seconds, naming ``what`` and the last value seen."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}; last value: {value!r}")
        await asyncio.sleep(poll)
