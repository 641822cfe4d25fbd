"""TaskOwner: owned tasks are cancelled and awaited on exit, even one that swallows a cancel."""

from __future__ import annotations

import asyncio

import pytest

from potluck import tasks
from potluck.tasks import TaskOwner


async def test_exit_cancels_and_awaits_every_task():
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(name)

    async with TaskOwner("t") as owner:
        a = owner.start(forever("a"), "a")
        b = owner.start(forever("b"), "b")
        await asyncio.sleep(0)
    assert a.cancelled() and b.cancelled()
    assert ended == ["b", "a"]  # reverse order of starting


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again(monkeypatch, caplog):
    # The shape of the 3.11 asyncio.wait_for race: the first CancelledError is lost and the
    # task loops on. Before the re-cancel, the owner's exit waited for it forever.
    monkeypatch.setattr(tasks, "RECANCEL_S", 0.05)
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels >= 2:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    async with TaskOwner("t") as owner:
        task = owner.start(stubborn(), "stubborn")
        await asyncio.sleep(0)
    assert task.cancelled() and cancels == 2
    assert "t:stubborn ignored its cancellation" in caplog.text


async def test_a_failed_task_is_recorded_and_does_not_break_the_exit():
    async def boom() -> None:
        raise ValueError("broken")

    async with TaskOwner("t") as owner:
        owner.start(boom(), "boom")
        await asyncio.wait_for(owner.failed.wait(), 5)
    assert isinstance(owner.failure, ValueError)


async def test_the_owners_own_cancellation_propagates():
    started: list[asyncio.Task] = []

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # still cleaning up when the owner itself is cancelled

    async def exiting() -> None:
        async with TaskOwner("t") as owner:
            started.append(owner.start(slow_to_stop(), "slow"))
            await asyncio.sleep(0)  # let it start, so that its cancel handler runs

    outer = asyncio.create_task(exiting())
    await asyncio.sleep(0.05)
    assert not outer.done()  # the exit waits for the slow task
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    started[0].cancel()
