"""The ``full-chain`` drill's steps: after the outage, every outage order verified downstream.

The sandbox's logistics re-push, lagging invoices and truncated finance postings
(agent/sandbox/downstream.py) meet the agent's verifier; the drill passes when the
agent's /status and lookups show exactly what the faults make, and
``edge-recover --mode chain`` on the same buffer agrees.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from agent.drill.sandbox import CHAIN_DEADLINE_H
from agent.drill.steps import Context, DrillFailed, Step, WaitUntil

STEPS = ("logistics", "invoice", "finance")


def outage_orders(ctx: Context) -> dict[str, str]:
    """serial -> channel_order_id of the orders the agent answered 202 for."""
    return {
        sent.serial: sent.key.split(":", 1)[1]
        for load in ctx.loads
        for sent in load.orders.values()
        if sent.status == 202 and sent.serial
    }


@dataclass
class HoldInvoice(Step):
    """One outage order whose invoice is never issued: the one made to be overdue."""

    async def run(self, ctx: Context) -> None:
        orders = outage_orders(ctx)
        if len(orders) < 2:
            raise DrillFailed(f"only {len(orders)} orders buffered; use more orders")
        serial = min(orders)
        ctx.sandbox.downstream.invoice_never.add(orders[serial])
        ctx.facts["held_invoice"] = serial


def _expected(ctx: Context) -> dict[str, dict[str, int]]:
    n = len(outage_orders(ctx))
    cut = len(ctx.sandbox.downstream.truncated)
    return {
        "logistics": {"verified": n, "pending": 0, "failed": 0, "overdue": 0},
        "invoice": {"verified": n - 1, "pending": 0, "failed": 0, "overdue": 1},
        "finance": {"verified": n - cut, "pending": 0, "failed": cut, "overdue": 0},
    }


@dataclass
class ChainSettled(Step):
    """/status shows exactly the faults' result; each lookup says the same of its order."""

    async def run(self, ctx: Context) -> None:
        ds = ctx.sandbox.downstream
        n = len(outage_orders(ctx))
        every = ds.truncate_every

        async def settled(c: Context) -> bool:
            shown = (await c.status()).get("chain")
            return len(ds.postings_seen) >= n and shown == _expected(c)

        timeout = CHAIN_DEADLINE_H * 3600 + 30
        await WaitUntil("the chain to settle", settled, timeout, "chain_s", "restore:primary").run(
            ctx
        )
        if every and len(ds.truncated) != n // every:
            raise DrillFailed(f"{len(ds.truncated)} truncated postings, expected {n // every}")
        lookups: dict[str, dict[str, str]] = {}
        for serial, _ in sorted(outage_orders(ctx).items()):
            async with ctx.session.get(f"{ctx.agent.url}/v1/orders/{serial}") as r:
                doc: dict[str, Any] = await r.json()
            chain, order_id = doc.get("chain") or {}, str(doc.get("order_id"))
            want = {
                "logistics": "verified",
                "invoice": "overdue" if serial == ctx.facts["held_invoice"] else "verified",
                "finance": "failed" if order_id in ds.truncated else "verified",
            }
            if chain != want:
                raise DrillFailed(f"{serial}: chain {chain}, expected {want}")
            if ds.repush_calls[order_id] != 1:
                raise DrillFailed(f"{serial}: tracking re-pushed {ds.repush_calls[order_id]}x")
            lookups[serial] = chain
        ctx.facts["lookups"] = lookups
        ctx.figures.update(chain_orders=n, chain_failed=len(ds.truncated), chain_overdue=1)


@dataclass
class ChainRecover(Step):
    """``edge-recover --mode chain`` over the agent's buffer agrees, both values shown."""

    async def run(self, ctx: Context) -> None:
        report = ctx.workdir / "chain-report.json"
        args = [sys.executable, "-m", "recovery", "--path", str(ctx.agent.spool)]
        args += ["--mode", "chain", "--config", str(ctx.agent.config), "--report", str(report)]
        started = time.monotonic()
        with open(ctx.workdir / "chain-recover.log", "wb") as log:
            done = await asyncio.to_thread(subprocess.run, args, stdout=log, stderr=log)
        ctx.figures["chain_recover_s"] = round(time.monotonic() - started, 3)
        if done.returncode != 1:
            raise DrillFailed(f"edge-recover --mode chain exited {done.returncode}, expected 1")
        doc = orjson.loads(report.read_bytes())
        seen = {o["serial"]: {k: v["state"] for k, v in o["steps"].items()} for o in doc["orders"]}
        if seen != ctx.facts["lookups"]:
            raise DrillFailed("edge-recover --mode chain disagrees with the agent's lookups")
        ds = ctx.sandbox.downstream
        for o in doc["orders"]:
            posted = ds.truncated.get(str(o["order_id"]))
            detail = o["steps"]["finance"]["detail"]
            if (
                posted is not None
                and f"is {orjson.dumps(posted).decode()} downstream" not in detail
            ):
                raise DrillFailed(f"{o['serial']}: no posted value in {detail!r}")
            if posted is not None and "expected " not in detail:
                raise DrillFailed(f"{o['serial']}: no expected value in {detail!r}")
