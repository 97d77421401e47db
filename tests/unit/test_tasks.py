"""cancel_and_wait: the one way a component's stop() ends its background tasks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.base.tasks import cancel_and_wait


async def test_returns_only_after_the_task_finished_its_cleanup() -> None:
    cleaned: list[str] = []
    started = asyncio.Event()

    async def worker() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits: stop() must wait for it
            cleaned.append("closed")

    task = asyncio.create_task(worker(), name="worker")
    await started.wait()
    await cancel_and_wait(task, None)
    assert cleaned == ["closed"] and task.done()


async def test_a_task_that_had_failed_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise OSError("disk gone")

    task = asyncio.create_task(broken(), name="broken-writer")
    await asyncio.wait([task])
    with caplog.at_level(logging.ERROR, logger="agent.tasks"):
        await cancel_and_wait(task)
    assert "broken-writer" in caplog.text and "disk gone" in caplog.text


async def test_cancelling_the_stopper_is_not_swallowed() -> None:
    """A stop() cancelled while it waits (e.g. a shutdown deadline) must end cancelled,
    not return as if it had finished: suppressing CancelledError around ``await task``
    would do that."""
    release = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()
            raise

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    for _ in range(3):  # the task is now in its slow cleanup
        await asyncio.sleep(0)
    stopper.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert task.cancelled()
