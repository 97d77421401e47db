"""Failover and failback timing of the real agent against the loopback sandbox.

    python bench/failover.py [--reps 10]

With the default health settings (interval 1 s, timeout 1 s, thresholds 3/2) it
measures, per repetition:

* failover: the primary fails (``refuse``: connections refused; ``503``; ``hang``:
  accepts and never answers) -> the first order created on the standby, under a
  steady load of 20 orders/s; and the longest any order waited for its answer
  in that window (goal: <= upstream.timeout_s + 1 s);
* drain start: with orders buffered, the primary comes back -> the first buffered
  order created on it, counted from the moment the agent declares it healthy.

It prints the median and max next to the configured detection bound
(unhealthy_threshold x interval + timeout) measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from agent.drill.agent_proc import AgentUnderDrill
from agent.drill.sandbox import Sandbox

INTERVAL, TIMEOUT, UNHEALTHY, HEALTHY = 1.0, 1.0, 3, 2
UPSTREAM_TIMEOUT = 2.0  # drill_config's upstream.timeout_s


class Load:
    """A steady trickle of orders; remembers the slowest answer."""

    def __init__(self, url: str, prefix: str, rate: float = 20.0) -> None:
        self.url, self.prefix, self.rate = f"{url}/v1/orders", prefix, rate
        self.n = 0
        self.max_wait = 0.0
        self.errors = 0
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            self.n += 1
            body = orjson.dumps(
                {"channel_id": "bench", "channel_order_id": f"{self.prefix}-{self.n}"}
            )
            task = asyncio.create_task(self._one(session, body))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            await asyncio.sleep(1 / self.rate)
        await asyncio.gather(*self._inflight)

    async def _one(self, session: aiohttp.ClientSession, body: bytes) -> None:
        started = time.monotonic()
        try:
            async with session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                if r.status >= 300:
                    self.errors += 1
        except aiohttp.ClientError:
            self.errors += 1
        self.max_wait = max(self.max_wait, time.monotonic() - started)

    def stop(self) -> None:
        self._stop.set()


async def _until(pred, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def failover_once(
    box: Sandbox, session: aiohttp.ClientSession, work: Path, how: str, rep: int
) -> tuple[float, float]:
    box.reset()
    (work / f"{how}-{rep}").mkdir(parents=True)
    agent = AgentUnderDrill(
        work / f"{how}-{rep}",
        box,
        interval_s=INTERVAL,
        health_timeout_s=TIMEOUT,
        unhealthy=UNHEALTHY,
        healthy=HEALTHY,
    )
    await agent.start_ready(session)
    primary, standby = box.centers["primary"], box.centers["standby"]
    load = Load(agent.url, f"{how}{rep}")
    task = asyncio.create_task(load.run(session))
    try:
        await _until(lambda: len(primary.creates) >= 5)
        load.max_wait = 0.0  # from here on: the failover window
        failed_at = time.monotonic()
        if how == "refuse":
            await primary.go_down()
        elif how == "503":
            primary.mode = "503"
        else:
            primary.delay_s = primary.health_delay_s = 30.0  # accepts, never answers
        first = await _until(lambda: len(standby.creates) > 0)
        await asyncio.sleep(UPSTREAM_TIMEOUT + 1.5)  # let requests in flight at the switch end
        return first - failed_at, load.max_wait
    finally:
        load.stop()
        await task
        primary.delay_s = 0.0
        await primary.come_up()
        await agent.stop()


async def drain_start_once(
    box: Sandbox, session: aiohttp.ClientSession, work: Path, rep: int
) -> float:
    box.reset()
    (work / f"drain-{rep}").mkdir(parents=True)
    agent = AgentUnderDrill(
        work / f"drain-{rep}",
        box,
        interval_s=INTERVAL,
        health_timeout_s=TIMEOUT,
        unhealthy=UNHEALTHY,
        healthy=HEALTHY,
    )
    primary = box.centers["primary"]
    await primary.go_down()
    await box.centers["standby"].go_down()
    await agent.start_ready(session)
    try:
        for n in range(20):
            body = orjson.dumps({"channel_id": "bench", "channel_order_id": f"d{rep}-{n}"})
            async with session.post(
                f"{agent.url}/v1/orders", data=body, headers={"Content-Type": "application/json"}
            ) as r:
                assert r.status == 202, await r.text()
        await primary.come_up()
        await _until(lambda: len(primary.creates) > 0)
        first_wall = time.time()
        status = await agent.status(session)
        declared = float(status["clusters"]["primary"]["since"])  # agent's wall clock
        return first_wall - declared
    finally:
        await box.centers["standby"].come_up()
        await agent.stop()


def _row(name: str, values: list[float], goal: str) -> str:
    return (
        f"{name:<34} median {statistics.median(values):6.3f}s  max {max(values):6.3f}s"
        f"   goal {goal}"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    bound = UNHEALTHY * INTERVAL + TIMEOUT
    box = await Sandbox().start()
    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    results: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            for how in ("refuse", "503", "hang"):
                for rep in range(args.reps):
                    took, wait = await failover_once(box, s, work, how, rep)
                    results.setdefault(how, []).append(took)
                    waits.setdefault(how, []).append(wait)
            drains = [await drain_start_once(box, s, work, rep) for rep in range(args.reps)]
    finally:
        await box.stop()
    print(
        f"health: interval {INTERVAL}s, timeout {TIMEOUT}s, thresholds "
        f"{UNHEALTHY}/{HEALTHY}; upstream.timeout_s {UPSTREAM_TIMEOUT}s; {args.reps} reps"
    )
    print(f"configured detection bound (unhealthy x interval + timeout): {bound:.1f}s")
    for how in ("refuse", "503", "hang"):
        print(_row(f"failover, primary {how}", results[how], "<= 4.0s worst case"))
        print(_row(f"  longest order wait ({how})", waits[how], f"<= {UPSTREAM_TIMEOUT + 1:.1f}s"))
    print(_row("drain start after declared healthy", drains, "<= 1.5s"))
    worst = max(max(v) for v in results.values())
    print(f"ratio worst failover / detection bound: {worst / bound:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
