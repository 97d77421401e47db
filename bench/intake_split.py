"""Benchmark: would several intake processes pay on this machine? Their ceiling, measured.

    .venv/bin/python bench/intake_split.py [--orders 12000] [--agents 2] [--rounds 2]

Issue 23 asks whether offline intake should run in several worker processes (one core
each). Before building that (a shared dedupe, serial blocks, one drain), this measures
what it could give at best: ``--agents`` fully independent agents (each its own port,
buffer, state and serial counter: nothing shared, so no coordination cost at all) with
the same ``--concurrency`` clients split among them, against one agent taking them all,
alternated in the same run (one, split, one, split ...). The split figure is an upper
bound: real workers would add the cost of sharing the dedupe and the journal.

Prints per run: orders/s, p50/p99, the agents' CPU per order (all processes), the bench
client's; and the split/one ratio of rates. Every 202'd serial must be a pending/ file
of the agent that acknowledged it (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.intake import (  # noqa: E402
    Child,
    RunStats,
    agent_requests,
    drive,
    free_port,
    load_average,
    new_session,
    pending_serials,
    start_agent,
    wait_agent,
)


async def one_run(
    tmp: Path, agents: int, orders: int, concurrency: int, tag: str
) -> dict[str, Any]:
    """``agents`` independent agents, ``concurrency`` clients split evenly among them."""
    dead = f"http://127.0.0.1:{free_port()}/v3"  # nothing listens: every order is buffered
    children: list[tuple[Child, str, Path]] = []
    try:
        for n in range(agents):
            work = tmp / f"{tag}-agent{n}"
            child, base = start_agent(work, dead)
            children.append((child, base, work))
        per_agent = orders // agents
        async with new_session(concurrency) as session:
            for child, base, _ in children:
                await wait_agent(session, child, base, "offline")
            batches = [
                agent_requests(base, f"SPLIT-{tag}-{n}-{os.getpid()}", per_agent, seed=n + 1)
                for n, (_, base, _) in enumerate(children)
            ]
            serials: list[set[str]] = [set() for _ in children]

            def collector(into: set[str]) -> Callable[[bytes], None]:
                return lambda payload: into.add(orjson.loads(payload)["serial"])

            cpu0 = [c.cpu() for c, _, _ in children]
            me0 = time.process_time()
            start = time.perf_counter()
            parts = await asyncio.gather(
                *(
                    drive(session, reqs, concurrency // agents, 202, collector(serials[n]))
                    for n, reqs in enumerate(batches)
                )
            )
            elapsed = time.perf_counter() - start
            me1 = time.process_time()
            cpu1 = [c.cpu() for c, _, _ in children]
    finally:
        for child, _, _ in children:
            child.stop()
    stats = RunStats()
    for part in parts:
        stats.merge(part)
    stats.elapsed_s = elapsed
    missing = 0
    for (_, _, work), acked in zip(children, serials, strict=True):
        missing += len(acked - pending_serials(work))
    user = sum(b[0] - a[0] for a, b in zip(cpu0, cpu1, strict=True))
    system = sum(b[1] - a[1] for a, b in zip(cpu0, cpu1, strict=True))
    for _, _, work in children:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "stats": stats,
        "user_us": user / max(1, stats.ok) * 1e6,
        "sys_us": system / max(1, stats.ok) * 1e6,
        "cores": (user + system) / elapsed,
        "client_us": (me1 - me0) / max(1, stats.ok) * 1e6,
        "missing": missing,
    }


def report(label: str, r: dict[str, Any]) -> None:
    s: RunStats = r["stats"]
    print(
        f"  {label:<10} {s.rate:7.0f} orders/s  p50 {s.p(50):6.2f} ms  p99 {s.p(99):6.2f} ms  "
        f"agents {r['cores']:.2f} cores, {r['user_us']:.0f} + {r['sys_us']:.0f} us/order  "
        f"client {r['client_us']:.0f} us/order  not 202: {s.unexpected}  "
        f"202 without a file: {r['missing']}  (load {os.getloadavg()[0]:.1f})",
        flush=True,
    )


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=12000, help="orders per run (default 12000)")
    p.add_argument("--agents", type=int, default=2, help="independent agents (default 2)")
    p.add_argument("--concurrency", type=int, default=32, help="clients in all (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="one/split pairs (default 2)")
    args = p.parse_args()
    print(
        f"intake split: {args.orders} orders per run, {args.concurrency} clients, "
        f"1 agent vs {args.agents} independent agents, {os.cpu_count()} CPUs, "
        f"load {load_average()}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="edge-split-"))
    ok = True
    ratios = []
    try:
        for rnd in range(args.rounds):
            order = [1, args.agents] if rnd % 2 == 0 else [args.agents, 1]
            rates = {}
            for agents in order:
                r = await one_run(tmp, agents, args.orders, args.concurrency, f"r{rnd}a{agents}")
                report("1 agent" if agents == 1 else f"{agents} agents", r)
                rates[agents] = r["stats"].rate
                ok = ok and r["missing"] == 0 and r["stats"].unexpected == 0
            ratios.append(rates[args.agents] / rates[1])
            print(f"  round {rnd + 1}: {args.agents} agents / 1 agent = {ratios[-1]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"ceiling of {args.agents} intake processes (nothing shared): "
        + ", ".join(f"{r:.2f}x" for r in ratios)
        + " the rate of one"
    )
    if not ok:
        print("ERRORS: an order was not acknowledged, or a 202'd serial has no file")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
