"""GroupCommit: batches flushed one at a time, or several in flight where a flush waits."""

from __future__ import annotations

import asyncio

from agent.base.batching import GroupCommit


async def _first_batch_held(in_flight: int) -> list[list[int]]:
    """The first flush waits until released; what was flushed before that release."""
    release = asyncio.Event()
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[BaseException | None]:
        flushed.append(items)
        if items == [0]:
            await release.wait()
        return [None] * len(items)

    commit = GroupCommit[int]("test", flush, in_flight=in_flight)
    commit.start()
    first = commit.enqueue(0)
    await asyncio.sleep(0)  # the first batch is taken alone
    second = commit.enqueue(1)
    for _ in range(20):
        await asyncio.sleep(0)
    seen = [list(b) for b in flushed]
    assert not first.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    await commit.stop()
    return seen


async def test_one_in_flight_flushes_batches_one_after_another() -> None:
    assert await _first_batch_held(1) == [[0]]


async def test_a_slow_batch_does_not_hold_up_the_next_when_several_may_be_in_flight() -> None:
    assert await _first_batch_held(2) == [[0], [1]]


async def test_stop_waits_for_every_batch_in_flight() -> None:
    done: list[int] = []

    async def flush(items: list[int]) -> list[BaseException | None]:
        await asyncio.sleep(0.01 * (3 - items[0]))
        done.extend(items)
        return [None] * len(items)

    commit = GroupCommit[int]("test", flush, max_batch=1, in_flight=3)
    commit.start()
    futures = [commit.enqueue(i) for i in range(3)]
    await asyncio.wait_for(commit.stop(), 5)
    assert sorted(done) == [0, 1, 2] and all(f.done() for f in futures)
