"""Benchmark: chain verification (issue 20) — intake with the verifier busy, and 100,000
outage orders through three steps with ``edge-recover --mode chain``.

    .venv/bin/python bench/chain.py             # full run (a few minutes)
    .venv/bin/python bench/chain.py --quick     # smoke run (under a minute)

(a) Offline durable intake of two real agents in one run, their primaries dead: one
    whose verifier is busy (``--backlog`` outage orders in merged/, three steps against
    a downstream that answers 404 after ``--slow-ms``: every check stays pending and is
    rechecked every second, 8 in flight at all times) and one whose verifier is idle
    (nothing to check). Blocks of orders are sent to each in turn (A, B, A, B, ...) so
    the disk's drift hits both alike. Goal: busy within 10% of idle (rate and p99).
(b) ``edge-recover --mode chain`` over ``--orders`` merged/ copies against a fast
    loopback downstream (all verified at the first check), three steps, concurrency
    ``--concurrency`` (the [chain] default, 8, is what a real ERP tolerates; the figure
    is also taken at 32). Goal: under 2 minutes. The baseline in the same run: the same
    number of bare GETs (aiohttp, keep-alive, same concurrency, no ledger) against the
    same server (30,000 measured, scaled), the floor under any verifier. With
    ``--profile`` the run is profiled (cProfile, top functions by own time) to say where
    the time goes.

The downstreams run in their own processes (``--serve``). Exit 1 if a run was invalid
(an order not acknowledged, a check that did not end as expected); 0 otherwise,
whether the goals are met or not. The machine may be shared: the load average is
printed at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.drill.agent_proc import write_config_file  # noqa: E402
from agent.spool.record import PendingRecord  # noqa: E402
from bench.intake import (  # noqa: E402
    BenchError,
    Child,
    RunStats,
    agent_requests,
    drive,
    free_port,
    load_average,
    new_session,
    wait_agent,
    wait_until,
)

GOAL_INTAKE = 0.10  # busy within 10% of idle
GOAL_CHAIN_S = 120.0
BARE_SAMPLE = 30_000  # bare GETs measured for the baseline, scaled to the checks' number


# -- the downstream: one process, three routes ----------------------------------------


def serve(port: int, delay_s: float, status: int) -> None:
    """TMS, invoicing and ERP in one: 200 with what the steps look for (fast), or
    ``status`` after ``delay_s`` (slow: 404, not yet)."""
    from aiohttp import web

    async def answer(doc: dict[str, object]) -> web.Response:
        if delay_s:
            await asyncio.sleep(delay_s)
        if status != 200:
            return web.json_response({"error": "not yet"}, status=status)
        return web.json_response(doc)

    async def tracks(request: web.Request) -> web.Response:
        return await answer({"events": [{"code": "PICKED"}]})

    async def invoices(request: web.Request) -> web.Response:
        return await answer({"items": [{"invoice_no": "INV-1"}]})

    async def posting(request: web.Request) -> web.Response:
        return await answer({"order_id": request.match_info["id"], "amount": "199.10"})

    app = web.Application()
    app.router.add_get("/tms/tracks", tracks)
    app.router.add_get("/inv/invoices", invoices)
    app.router.add_get("/erp/postings/{id}", posting)
    web.run_app(app, host="127.0.0.5", port=port, print=None, access_log=None)


def start_downstream(work: Path, delay_s: float, status: int) -> tuple[Child, str]:
    port = free_port("127.0.0.5")
    argv = [sys.executable, __file__, "--serve", str(port), str(delay_s), str(status)]
    name = f"downstream-{status}"
    return Child(name, argv, work / f"{name}.log"), f"http://127.0.0.5:{port}"


async def wait_served(child: Child, url: str) -> None:
    async def up() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/tms/tracks") as r:
            return r.status in (200, 404)

    await wait_until(child, up, f"{url} to answer")


def chain_section(url: str, concurrency: int, recheck_s: float) -> dict[str, object]:
    return {
        "enabled": True,
        "deadline_h": 24,
        "recheck_interval_s": recheck_s,
        "concurrency": concurrency,
        "timeout_s": 10,
        "step": [
            {
                "name": "logistics",
                "check": f"GET {url}/tms/tracks?order_no={{order_id}}",
                "present": "/events/0",
            },
            {
                "name": "invoice",
                "check": f"GET {url}/inv/invoices?order_no={{order_id}}",
                "present": "/items/0/invoice_no",
            },
            {
                "name": "finance",
                "check": f"GET {url}/erp/postings/{{order_id}}",
                "equal": {"/amount": "{order:/amount}"},
            },
        ],
    }


def write_merged(spool: Path, n: int, tag: str) -> None:
    """``n`` merged/ copies as the drain leaves them (order_id and merged_at added)."""
    merged = spool / "merged"
    merged.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for i in range(n):
        body = orjson.dumps(
            {"channel_id": "douyin", "channel_order_id": f"{tag}{i}", "amount": "199.10"}
        ).decode()
        rec = PendingRecord(
            f"WH-BENCH-20261203-{i + 1:09d}",
            "wh-bench",
            "2026-12-03T10:00:00+08:00",
            "douyin",
            f"douyin:{tag}{i}",
            None,
            body,
        )
        doc = orjson.loads(rec.to_bytes())
        doc.update(order_id=f"OC-{tag}{i}", merged_at=now)
        (merged / rec.filename).write_bytes(orjson.dumps(doc))
    os.sync()


def row(label: str, value: str) -> None:
    print(f"  {label:<34} {value}", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- (a) intake with the verifier busy vs idle ------------------------------------------


async def phase_intake(tmp: Path, args: argparse.Namespace, errors: list[str]) -> None:
    print(
        f"(a) offline intake, verifier busy ({args.backlog} outage orders x 3 steps against "
        f"a downstream answering 404 after {args.slow_ms} ms) vs idle; "
        f"{args.blocks} blocks of {args.block} orders each, alternated",
        flush=True,
    )
    slow, slow_url = start_downstream(tmp, args.slow_ms / 1000, 404)
    dead = f"http://127.0.0.1:{free_port()}/v3"
    agents = {}
    with slow:
        await wait_served(slow, slow_url)
        for name, backlog in (("busy", args.backlog), ("idle", 0)):
            work = tmp / name
            work.mkdir()
            if backlog:
                write_merged(work / "spool", backlog, "bk")
            port = free_port()
            sections: dict[str, dict[str, object]] = {
                "agent": {
                    "node_id": f"bench-{name}",
                    "listen": f"127.0.0.1:{port}",
                    "state_dir": str(work / "state"),
                },
                "buffer": {"path": str(work / "spool"), "max_bytes": 1 << 40},
                "upstream": {"primary": dead, "timeout_s": 5},
                "health": {"interval_s": 0.5, "timeout_s": 0.5},
                "auth": {"tokens_file": ""},
                "sms": {"provider": "log"},
                "chain": chain_section(slow_url, 8, 1.0),
            }
            config = write_config_file(work / "agent.toml", sections)
            argv = [sys.executable, "-m", "agent", "run", "--config", str(config)]
            agents[name] = (
                Child(f"agent-{name}", argv, work / "agent.log"),
                f"http://127.0.0.1:{port}",
            )
        try:
            async with new_session(args.clients) as session:
                for child, base in agents.values():
                    await wait_agent(session, child, base, "offline")
                busy_child, busy_base = agents["busy"]

                async def enrolled() -> bool:
                    async with session.get(f"{busy_base}/status") as r:
                        doc = await r.json()
                    chain = doc.get("chain") or {}
                    return bool(sum(chain.get("finance", {}).values()) >= args.backlog)

                await wait_until(busy_child, enrolled, "the backlog enrolled")
                stats = {name: RunStats() for name in agents}
                for block in range(args.blocks):
                    for name, (_, base) in agents.items():
                        reqs = agent_requests(base, f"{name}-{block}", args.block, seed=block)
                        stats[name].merge(await drive(session, reqs, args.clients, 202))
                async with session.get(f"{busy_base}/status") as r:
                    chain = (await r.json())["chain"]
        finally:
            for child, _ in agents.values():
                child.stop()
    for name, s in stats.items():
        row(
            f"{name}: rate, p50 / p99",
            f"{s.rate:7.0f} orders/s, {s.p(50):.2f} / {s.p(99):.2f} ms ({s.ok} acked)",
        )
        if s.unexpected:
            errors.append(f"intake {name}: {s.unexpected} not acknowledged ({s.problems()})")
    busy, idle = stats["busy"], stats["idle"]
    pending = chain["finance"]["pending"]
    row("busy verifier during the run", f"{pending} finance checks still pending (never verified)")
    rate_ratio = busy.rate / idle.rate if idle.rate else 0.0
    p99_ratio = busy.p(99) / idle.p(99) if idle.p(99) else 0.0
    ok = rate_ratio >= 1 - GOAL_INTAKE and p99_ratio <= 1 + GOAL_INTAKE
    row(
        "busy / idle",
        f"rate {rate_ratio:.3f}, p99 {p99_ratio:.3f}   goal within 10%: {verdict(ok)}",
    )
    print(flush=True)


# -- (b) 100,000 outage orders, three steps -----------------------------------------------


def phase_chain(tmp: Path, args: argparse.Namespace, errors: list[str]) -> None:
    print(
        f"(b) edge-recover --mode chain: {args.orders} merged orders x 3 steps against a fast "
        "loopback downstream",
        flush=True,
    )
    fast, url = start_downstream(tmp, 0.0, 200)
    with fast:
        asyncio.run(wait_served(fast, url))
        for concurrency in args.concurrency:
            root = tmp / f"buf-{concurrency}"
            started = time.monotonic()
            write_merged(root, args.orders, "c")
            row("write the merged/ copies", f"{time.monotonic() - started:.1f} s (not counted)")
            cfg = write_config_file(
                root.parent / f"chain-{concurrency}.toml",
                {
                    "upstream": {"primary": "http://127.0.0.1:9/v3"},  # unused by chain mode
                    "chain": chain_section(url, concurrency, 300),
                },
            )
            report = root.parent / f"chain-{concurrency}.json"
            argv = [sys.executable]
            if args.profile:
                argv += ["-m", "cProfile", "-o", str(root.parent / f"chain-{concurrency}.prof")]
            argv += ["-m", "recovery", "--path", str(root), "--mode", "chain"]
            argv += ["--config", str(cfg), "--report", str(report)]
            started = time.monotonic()
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            elapsed = time.monotonic() - started
            summary = orjson.loads(report.read_bytes())["summary"] if report.exists() else {}
            if done.returncode != 0 or summary.get("verified") != 3 * args.orders:
                errors.append(
                    f"chain at {concurrency}: exit {done.returncode}, {summary.get('verified')} "
                    f"verified of {3 * args.orders}: {done.stderr[-500:]}"
                )
            sample = min(3 * args.orders, BARE_SAMPLE)
            bare = asyncio.run(bare_gets(url, sample, concurrency)) * 3 * args.orders / sample
            row(
                f"concurrency {concurrency}: edge-recover",
                f"{elapsed:6.1f} s  ({3 * args.orders / elapsed:,.0f} checks/s)   "
                f"goal < {GOAL_CHAIN_S:.0f} s: {verdict(elapsed < GOAL_CHAIN_S)}",
            )
            row(
                f"concurrency {concurrency}: bare GETs",
                f"{bare:6.1f} s  ({3 * args.orders / bare:,.0f} requests/s, the floor; "
                f"{sample} measured, scaled)",
            )
            if args.profile:
                show_profile(root.parent / f"chain-{concurrency}.prof")
    print(flush=True)


async def bare_gets(url: str, n: int, concurrency: int) -> float:
    """The yardstick: n keep-alive GETs at ``concurrency``, answers read and parsed."""
    paths = ("/tms/tracks?order_no=OC-1", "/inv/invoices?order_no=OC-1", "/erp/postings/OC-1")
    todo = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in todo:
                async with session.get(url + paths[i % 3]) as r:
                    orjson.loads(await r.read())

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - started


def show_profile(path: Path) -> None:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(12)
    lines = [line for line in out.getvalue().splitlines() if line.strip()][-14:]
    print("    profile (top by own time):")
    for line in lines:
        print("    " + line[:150])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small figures, for a smoke run")
    p.add_argument("--orders", type=int, default=100_000, help="(b) merged orders (100000)")
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[8, 32], help="(b) checks in flight"
    )
    p.add_argument("--backlog", type=int, default=5000, help="(a) outage orders pending (5000)")
    p.add_argument("--slow-ms", type=int, default=500, help="(a) the slow downstream's delay")
    p.add_argument("--blocks", type=int, default=6, help="(a) blocks per agent")
    p.add_argument("--block", type=int, default=1500, help="(a) orders per block")
    p.add_argument("--clients", type=int, default=32, help="(a) keep-alive clients")
    p.add_argument("--profile", action="store_true", help="(b) profile edge-recover")
    p.add_argument("--only", choices=("a", "b"), help="run one part")
    args = p.parse_args(argv)
    if args.quick:
        args.orders, args.backlog, args.blocks, args.block = 3000, 1000, 2, 300
        args.concurrency = [8]
    return args


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
        return 0
    args = parse_args(argv)
    errors: list[str] = []
    print(f"bench/chain.py  load average at start: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        try:
            if args.only in (None, "a"):
                asyncio.run(phase_intake(Path(tmp), args, errors))
            if args.only in (None, "b"):
                phase_chain(Path(tmp), args, errors)
        except BenchError as exc:
            errors.append(str(exc))
    print(f"load average at end: {load_average()}")
    for e in errors:
        print(f"ERROR: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
