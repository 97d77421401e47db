"""cancel_and_wait: the one way a component's stop() ends its background tasks; wait_set:
the one way a background loop waits for its event, so that it can be ended."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.base.tasks import cancel_and_wait, wait_set


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


async def test_a_loop_waiting_on_its_event_ends_when_cancelled_as_the_event_is_set() -> None:
    """The chain verifier's loop, stopped just as a check ended: the check's end sets
    the loop's event and, in the same turn of the event loop, stop() cancels the loop.
    The loop must end. With asyncio.wait_for (Python 3.11) it swallowed the cancel and
    waited again, and the agent's stop() waited for it forever: a CI run hung so."""
    wake = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait_set(wake, 60)
            wake.clear()
            rounds += 1

    looping = asyncio.create_task(loop(), name="loop")
    await asyncio.sleep(0)  # the loop waits now
    stopping = asyncio.create_task(cancel_and_wait(looping))  # stop() is due to run ...
    wake.set()  # ... and a check's end wakes the loop: both in this turn, stop() first
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, f"stop() still waits for the loop after 5 s ({rounds} rounds ran on)"
    assert looping.cancelled() and rounds == 0


async def test_wait_set_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 5) is True
    assert await wait_set(event, 0) is True  # already set: no wait at all


def test_no_wait_for_in_the_agent_or_edge_recover() -> None:
    """Every wait in agent/ and recovery/ goes through wait_set or asyncio.timeout: on
    Python 3.11 asyncio.wait_for can swallow the cancellation that stop() relies on."""
    root = Path(__file__).resolve().parents[2]
    found = [
        f"{path.relative_to(root)}:{number}"
        for package in ("agent", "recovery")
        for path in sorted((root / package).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "wait_for(" in line
    ]
    assert not found, f"asyncio.wait_for used at {found}: use wait_set or asyncio.timeout"
