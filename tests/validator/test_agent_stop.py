"""The agent's stop closes each resource within a bound and names one that overran."""

from __future__ import annotations

import asyncio
import logging

import pytest

from validator import agent


async def test_a_close_that_hangs_is_left_behind_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent, "CLOSE_TIMEOUT_S", 0.05)
    never = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="validator.agent")
    await asyncio.wait_for(agent._bounded_close("the chain client", never.wait()), 5)
    (record,) = caplog.records
    assert record.getMessage() == "a resource did not close in time; left behind"
    assert record.__dict__["resource"] == "the chain client"


async def test_a_close_that_fails_is_named_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise OSError("socket already closed")

    caplog.set_level(logging.WARNING, logger="validator.agent")
    await agent._bounded_close("the store", broken())
    (record,) = caplog.records
    assert record.__dict__["resource"] == "the store"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], OSError)


async def test_a_close_in_time_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="validator.agent")
    await agent._bounded_close("the channel to the master", asyncio.sleep(0))
    assert caplog.records == []
