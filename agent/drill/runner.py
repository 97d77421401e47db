"""Runs scenarios against a fresh agent each and checks the one promise from the
sandbox's own records: every acknowledged order created exactly once, at most
one SMS per serial, and every queued SMS sent unless its outcome is ambiguous."""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.drill.agent_proc import AgentUnderDrill
from agent.drill.replica import replica_for, replication_section, skip_reason
from agent.drill.sandbox import Sandbox
from agent.drill.scenarios import NEEDS_NATS, SCENARIOS
from agent.drill.steps import Context, Settle


@dataclass
class Result:
    scenario: str
    passed: bool
    sent: int = 0
    acked: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    sms_sent: int = 0
    sms_twice: list[str] = field(default_factory=list)
    sms_missing: int = 0
    sms_ambiguous: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    error: str | None = None
    skipped: str | None = None  # why the scenario could not run here (not a failure)

    @property
    def failed(self) -> bool:
        return not self.passed and self.skipped is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "passed": self.passed,
            "sent": self.sent,
            "acknowledged": self.acked,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "sms_sent": self.sms_sent,
            "sms_twice": len(self.sms_twice),
            "sms_missing": self.sms_missing,
            "sms_ambiguous": self.sms_ambiguous,
            "figures": self.figures,
            "elapsed_s": self.elapsed_s,
            "error": self.error,
            "skipped": self.skipped,
            "lost_keys": self.lost[:50],
            "duplicated_keys": dict(list(self.duplicated.items())[:50]),
            "sms_twice_serials": self.sms_twice[:50],
        }


async def run_drills(names: list[str], orders: int, keep: bool = False) -> list[Result]:
    results = []
    root = Path(tempfile.mkdtemp(prefix="edge-drill-"))
    sandbox = await Sandbox().start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            for name in names:
                sandbox.reset()
                results.append(await _run_one(name, sandbox, session, root / name, orders))
    finally:
        await sandbox.stop()
        if not keep and not any(r.failed for r in results):
            shutil.rmtree(root, ignore_errors=True)
    return results


async def _run_one(
    name: str, sandbox: Sandbox, session: aiohttp.ClientSession, workdir: Path, orders: int
) -> Result:
    workdir.mkdir(parents=True)
    reason = skip_reason(name in NEEDS_NATS)
    if reason is not None:
        return Result(scenario=name, passed=False, skipped=reason)
    started = time.monotonic()
    error = None
    try:
        async with replica_for(name in NEEDS_NATS, workdir) as cluster:
            agent = AgentUnderDrill(workdir, sandbox, extra=replication_section(cluster))
            ctx = Context(sandbox, agent, session, workdir, name, orders, nats=cluster)
            try:
                await agent.start_ready(session)
                for step in SCENARIOS[name]:
                    await step.run(ctx)
                await Settle().run(ctx)
                status = await ctx.status()
            except Exception as exc:  # report the scenario as failed, keep drilling the others
                error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=open(workdir / "drill-error.txt", "w"))  # noqa: SIM115
                status = {}
            finally:
                for task in ctx.tasks:
                    task.cancel()
                if ctx.agent_running:
                    await agent.stop()
    except (OSError, TimeoutError) as exc:  # the scenario's NATS cluster did not come up
        return Result(scenario=name, passed=False, error=f"NATS cluster: {exc}")
    result = _verify(ctx, status)
    result.error = error
    result.passed = result.passed and error is None
    result.elapsed_s = round(time.monotonic() - started, 2)
    if not result.passed:
        result.figures["workdir"] = str(workdir)  # type: ignore[assignment]
    return result


def _verify(ctx: Context, status: dict[str, Any]) -> Result:
    creates = ctx.sandbox.creates()
    acked: set[str] = set()
    queued: dict[str, str] = {}
    for load in ctx.loads:
        acked |= load.acked_keys
        queued.update(load.sms_queued)
    sms = ctx.sandbox.sms.per_serial()
    ambiguous = int(status.get("sms", {}).get("by_state", {}).get("ambiguous", 0))
    missing = sum(1 for serial in queued if serial not in sms)
    result = Result(
        scenario=ctx.name,
        passed=False,
        sent=sum(len(load.orders) for load in ctx.loads),
        acked=len(acked),
        lost=sorted(acked - set(creates)),
        duplicated={k: n for k, n in creates.items() if n > 1},
        sms_sent=sum(sms.values()),
        sms_twice=sorted(s for s, n in sms.items() if n > 1),
        sms_missing=missing,
        sms_ambiguous=ambiguous,
        figures=dict(ctx.figures),
    )
    result.passed = (
        not result.lost
        and not result.duplicated
        and not result.sms_twice
        and missing <= ambiguous
        and result.acked == result.sent
    )
    return result


__all__ = ["SCENARIOS", "Result", "run_drills"]
