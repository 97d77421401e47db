"""The step vocabulary drill scenarios are written in, and the context they act on."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.drill.agent_proc import AgentUnderDrill
from agent.drill.load import Load
from agent.drill.sandbox import PRIMARY_NAME, Sandbox
from agent.sandbox.nats_cluster import NatsCluster


class DrillFailed(Exception):
    """A step could not do its job (a wait timed out, a process misbehaved)."""


@dataclass
class Context:
    sandbox: Sandbox
    agent: AgentUnderDrill
    session: aiohttp.ClientSession
    workdir: Path
    name: str
    orders: int
    loads: list[Load] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    agent_running: bool = True
    facts: dict[str, Any] = field(default_factory=dict)  # what one step tells a later one
    nats: NatsCluster | None = None  # the replica's cluster, for the scenarios that need one

    def mark(self, what: str) -> None:
        self.marks[what] = time.monotonic()

    def new_load(self, share: float = 1.0, rate: float | None = None) -> Load:
        load = Load(
            self.agent.url,
            f"{self.name}-{len(self.loads)}",
            max(1, int(self.orders * share)),
            rate=rate,
        )
        self.loads.append(load)
        return load

    async def status(self) -> dict[str, Any]:
        return await self.agent.status(self.session)


Predicate = Callable[[Context], "bool | Awaitable[bool]"]


async def _holds(pred: Predicate, ctx: Context) -> bool:
    result = pred(ctx)
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


class Step:
    async def run(self, ctx: Context) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass
class StartLoad(Step):
    """Start sending orders in the background (``share`` of --orders, ``rate``/s)."""

    share: float = 1.0
    rate: float | None = None

    async def run(self, ctx: Context) -> None:
        load = ctx.new_load(self.share, self.rate)
        ctx.tasks.append(asyncio.create_task(load.run(ctx.session)))


@dataclass
class WaitLoad(Step):
    async def run(self, ctx: Context) -> None:
        await asyncio.gather(*ctx.tasks)
        ctx.tasks.clear()


@dataclass
class Fail(Step):
    """``how``: "refuse" (listener closed), "503" (answers 503), "slow" (answers late),
    "late-create" (creates each order, then answers after the agent gave up on it),
    "401" (health 200, every order refused: an expired gateway token)."""

    center: str
    how: str = "refuse"

    async def run(self, ctx: Context) -> None:
        center = ctx.sandbox.centers[self.center]
        ctx.mark(f"fail:{self.center}")
        if self.how == "refuse":
            await center.go_down()
        elif self.how == "503":
            center.mode = "503"
        elif self.how == "late-create":
            center.late_s = 3.0  # the drill agent's upstream.timeout_s is shorter
        elif self.how == "401":
            center.refuse = 401
        else:
            center.delay_s = center.health_delay_s = 3.0


@dataclass
class Restore(Step):
    center: str | None = None

    async def run(self, ctx: Context) -> None:
        names = [self.center] if self.center else list(ctx.sandbox.centers)
        for name in names:
            await ctx.sandbox.centers[name].come_up()
            ctx.mark(f"restore:{name}")


@dataclass
class WaitUntil(Step):
    """Poll a condition with a deadline; optionally record the time since a mark."""

    what: str
    pred: Predicate
    timeout: float = 20.0
    record: str | None = None
    since: str | None = None

    async def run(self, ctx: Context) -> None:
        deadline = time.monotonic() + self.timeout
        while not await _holds(self.pred, ctx):
            if time.monotonic() > deadline:
                raise DrillFailed(f"timed out after {self.timeout}s waiting for {self.what}")
            await asyncio.sleep(0.02)
        if self.record and self.since:
            ctx.figures[self.record] = round(time.monotonic() - ctx.marks[self.since], 3)


@dataclass
class KillAgent(Step):
    """kill -9 once ``at`` of the current load was acknowledged."""

    at: float = 0.5

    async def run(self, ctx: Context) -> None:
        load = ctx.loads[-1]
        target = int(len(load.orders) * self.at)
        deadline = time.monotonic() + 30
        while load.acks < target:
            if time.monotonic() > deadline:
                raise DrillFailed(f"only {load.acks} of {target} acks before the kill")
            await asyncio.sleep(0.002)
        await ctx.agent.kill9()
        ctx.agent_running = False
        await asyncio.gather(*ctx.tasks)  # the rest of the load fails fast: not acked
        ctx.tasks.clear()


@dataclass
class StartAgent(Step):
    async def run(self, ctx: Context) -> None:
        await ctx.agent.start_ready(ctx.session)
        ctx.agent_running = True


@dataclass
class StopAgent(Step):
    async def run(self, ctx: Context) -> None:
        code = await ctx.agent.stop()
        ctx.agent_running = False
        if code != 0:
            raise DrillFailed(f"agent exited {code} on SIGTERM")


@dataclass
class SwitchDns(Step):
    """Point the primary's name at another center, as ops would."""

    to: str

    async def run(self, ctx: Context) -> None:
        ctx.sandbox.dns.set(PRIMARY_NAME, ctx.sandbox.centers[self.to].host)
        ctx.mark("dns-switch")


@dataclass
class Flap(Step):
    center: str
    period: float = 0.3
    duration: float = 4.0

    async def run(self, ctx: Context) -> None:
        center = ctx.sandbox.centers[self.center]
        end = time.monotonic() + self.duration
        flips = 0
        while time.monotonic() < end:
            center.mode = "503" if center.mode == "up" else "up"
            flips += 1
            await asyncio.sleep(self.period)
        center.mode = "up"
        ctx.figures["flaps"] = flips


@dataclass
class Merge(Step):
    """Run edge-recover on the agent's buffer; kill -9 it once ``kill_at`` is merged; rerun."""

    kill_at: float = 0.5

    async def run(self, ctx: Context) -> None:
        spool = ctx.agent.spool
        total = ctx.agent.pending()
        primary = ctx.sandbox.centers["primary"]
        args = [
            sys.executable,
            "-m",
            "recovery",
            "--path",
            str(spool),
            "--mode",
            "merge",
            "--target",
            primary.url,
            "--batch",
            "10",
            "--rate",
            "400",
            "--report",
            str(ctx.workdir / "merge-report.json"),
        ]
        ctx.mark("merge")
        log = open(ctx.workdir / "merge.log", "ab")  # noqa: SIM115 - closed below
        try:
            first = subprocess.Popen(args, stdout=log, stderr=log)
            target = int(total * self.kill_at)
            deadline = time.monotonic() + 30
            while len(primary.creates) < target and first.poll() is None:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
            killed = first.poll() is None
            if killed:
                first.kill()
            await asyncio.to_thread(first.wait)
            ctx.figures["merge_killed_at"] = len(primary.creates)
            second = await asyncio.to_thread(subprocess.run, args, stdout=log, stderr=log)
            if second.returncode != 0:
                raise DrillFailed(f"edge-recover rerun exited {second.returncode}; see merge.log")
        finally:
            log.close()
        ctx.figures["merge_s"] = round(time.monotonic() - ctx.marks["merge"], 3)
        if not killed:
            raise DrillFailed("edge-recover finished before it could be killed; use more orders")


@dataclass
class Settle(Step):
    """End state: everything up, the channel retries what was not acked, all drained."""

    timeout: float = 30.0

    async def run(self, ctx: Context) -> None:
        await Restore().run(ctx)
        if not ctx.agent_running:
            await StartAgent().run(ctx)
        await asyncio.gather(*ctx.tasks)
        ctx.tasks.clear()
        for load in ctx.loads:
            await load.run(ctx.session, only_unacked=True)

        async def quiet(c: Context) -> bool:
            st = await c.status()
            return c.agent.pending() == 0 and st["pending"] == 0 and st["sms_outbox"] == 0

        await WaitUntil("pending/ and the SMS outbox to drain", quiet, self.timeout).run(ctx)
