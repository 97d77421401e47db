"""The ``server-lost`` drill's steps: a warehouse group's replica (CONTRACT 11) saves the
orders of a server lost mid-outage.

The scenario needs ``nats-server``; where it is not installed the drill reports the
scenario SKIPPED with the reason (``skip_reason``) and installs nothing. Where it is,
``replica_for`` starts a real three-node cluster on loopback for that scenario alone, the
drill's agent runs with ``[replication]`` on, and another machine's ``edge-recover
--from-replica`` (a real subprocess, as an operator runs it) merges the lost orders.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import orjson

from agent.base.syscalls import dies_with_parent
from agent.drill.agent_proc import Sections, drill_config, write_config_file
from agent.drill.steps import Context, DrillFailed, Step
from agent.replica.stream import STREAM
from agent.sandbox.nats_cluster import NatsCluster, available, quiet_errors
from agent.sandbox.servers import free_port

NATS_MISSING = "nats-server not installed: apt-get install nats-server"
OTHER_NODE = "drill-02"  # the machine that takes the lost server's orders over


def skip_reason(needs_nats: bool) -> str | None:
    """Why a scenario cannot run here, or None."""
    return NATS_MISSING if needs_nats and not available() else None


@asynccontextmanager
async def replica_for(needs_nats: bool, workdir: Path) -> AsyncIterator[NatsCluster | None]:
    """A ready three-node cluster under ``workdir/nats`` for a scenario that needs one
    (its nodes die with the drill, however it ends); None for the others."""
    if not needs_nats:
        yield None
        return
    cluster = NatsCluster(workdir / "nats", name="edge-drill", preexec=dies_with_parent())
    cluster.start()  # from the loop's thread: the death signal follows this thread
    try:
        await cluster.wait_ready()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


def replication_section(cluster: NatsCluster | None) -> Sections:
    """The agent's ``[replication]`` for ``cluster``: no 202 before a quorum stored it."""
    if cluster is None:
        return {}
    return {
        "replication": {
            "enabled": True,
            "servers": cluster.urls,
            "replicas": 3,
            "required": True,
            "timeout_s": 2,
        }
    }


def _cluster(ctx: Context) -> NatsCluster:
    if ctx.nats is None:
        raise DrillFailed(f"scenario {ctx.name} has no NATS cluster; list it in NEEDS_NATS")
    return ctx.nats


@dataclass
class KillNatsNode(Step):
    """kill -9 one NATS node once ``at`` of the current load was acknowledged: the stream's
    leader (JetStream elects another: seconds of 503) or, by default, a follower."""

    leader: bool = False
    at: float = 0.3

    async def run(self, ctx: Context) -> None:
        cluster = _cluster(ctx)
        leader = await _stream_leader(cluster)
        node = next(n for n in cluster.nodes if (n.name == leader) == self.leader)
        load = ctx.loads[-1]
        target = int(len(load.orders) * self.at)
        deadline = time.monotonic() + 30
        while load.acks < target and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        ctx.mark("nats-kill")
        await asyncio.to_thread(cluster.kill, node)
        ctx.figures["nats_killed_at"] = load.acks


async def _stream_leader(cluster: NatsCluster) -> str:
    """The name of the node leading the replica's stream now."""
    nc = await nats.connect(
        servers=cluster.urls, connect_timeout=1, allow_reconnect=False, error_cb=quiet_errors
    )
    try:
        info = await nc.jetstream(timeout=2).stream_info(STREAM)
    finally:
        await nc.close()
    if info.cluster is None or not info.cluster.leader:
        raise DrillFailed(f"stream {STREAM} has no leader now")
    return info.cluster.leader


@dataclass
class AllAccepted(Step):
    """Every order of the last load answered 202 (buffered and replicated). With
    ``retry_s`` the channel retries the others until then, as a real one would (one NATS
    node lost: until JetStream elects new leaders, an order may get 503)."""

    retry_s: float = 0.0
    record: str | None = None
    since: str | None = None

    async def run(self, ctx: Context) -> None:
        load = ctx.loads[-1]
        deadline = time.monotonic() + self.retry_s
        retries = 0
        while load.unacked:
            if time.monotonic() >= deadline:
                seen = Counter(s.status for s in load.orders.values() if not s.acked)
                raise DrillFailed(
                    f"{load.unacked} of {len(load.orders)} orders not accepted "
                    f"(last answers: {dict(seen)}) after {self.retry_s}s"
                )
            retries += 1
            await asyncio.sleep(0.1)
            await load.run(ctx.session, only_unacked=True)
        other = Counter(s.status for s in load.orders.values() if s.status != 202)
        if other:
            raise DrillFailed(f"orders answered other than 202 during the outage: {dict(other)}")
        if retries:
            ctx.figures["retry_rounds"] = ctx.figures.get("retry_rounds", 0) + retries
        if self.record and self.since:
            ctx.figures[self.record] = round(time.monotonic() - ctx.marks[self.since], 3)


@dataclass
class LoseServer(Step):
    """The server is lost mid-outage: the agent killed -9, its state_dir and buffer
    deleted (a dead disk). Only the replica still holds its orders."""

    async def run(self, ctx: Context) -> None:
        ctx.figures["lost_buffered"] = ctx.agent.pending()
        await ctx.agent.kill9()
        ctx.agent_running = False
        shutil.rmtree(ctx.agent.state_dir)
        shutil.rmtree(ctx.agent.spool)
        ctx.mark("server-lost")


@dataclass
class Takeover(Step):
    """From another machine: ``edge-recover --from-replica NODE --mode merge``, then
    ``--mode verify``, each a real subprocess with that machine's config (which names the
    center); both must exit 0."""

    async def run(self, ctx: Context) -> None:
        lost = tomllib.loads(ctx.agent.config.read_text(encoding="utf-8"))["agent"]["node_id"]
        config = self._other_machine(ctx)
        report = ctx.workdir / "takeover-report.json"
        common = ["--from-replica", lost, "--config", str(config)]
        started = time.monotonic()
        await _recover(ctx, [*common, "--mode", "merge", "--report", str(report)])
        ctx.figures["takeover_s"] = round(time.monotonic() - started, 3)
        if "restore:primary" in ctx.marks:
            ctx.figures["drain_s"] = round(time.monotonic() - ctx.marks["restore:primary"], 3)
        ctx.figures["taken_over"] = orjson.loads(report.read_bytes())["summary"]["created"]
        await _recover(ctx, [*common, "--mode", "verify"])

    def _other_machine(self, ctx: Context) -> Path:
        other = ctx.workdir / "other"
        other.mkdir(exist_ok=True)
        sections = drill_config(other, ctx.sandbox, free_port())
        sections["agent"]["node_id"] = OTHER_NODE
        centers = ctx.sandbox.centers
        sections["upstream"]["primary"] = centers["primary"].url
        sections["upstream"]["standby"] = centers["standby"].url
        return write_config_file(other / "agent.toml", sections | replication_section(ctx.nats))


async def _recover(ctx: Context, args: list[str]) -> None:
    with open(ctx.workdir / "takeover.log", "ab") as log:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "recovery", *args], stdout=log, stderr=log
        )
    if done.returncode != 0:
        mode = args[args.index("--mode") + 1]
        raise DrillFailed(f"edge-recover --mode {mode} exited {done.returncode}; see takeover.log")


@dataclass
class SerialsMatch(Step):
    """The serial a customer holds (the 202's, the SMS's) names the order the center
    created: the takeover sent each order under its own serial, not a new one."""

    async def run(self, ctx: Context) -> None:
        created: dict[str, str] = {}
        for center in ctx.sandbox.centers.values():
            created.update(center.serials)
        answered = {k: s.serial for load in ctx.loads for k, s in load.orders.items() if s.acked}
        wrong = {k: (s, created.get(k)) for k, s in answered.items() if created.get(k) != s}
        if wrong:
            sample = dict(list(wrong.items())[:5])
            raise DrillFailed(f"{len(wrong)} orders created under another serial: {sample}")
        stray = sorted(set(ctx.sandbox.sms.per_serial()) - set(answered.values()))
        if stray:
            raise DrillFailed(f"SMS sent for serials no 202 gave: {stray[:5]}")
        ctx.figures["serials_checked"] = len(answered)
