"""Benchmark: what replication through NATS JetStream costs (issue 22, CONTRACT 11).

    python bench/replication.py [--orders 3000] [--concurrency 32] [--takeover 100000]
                                [--only intake|takeover]

In one run, on this machine, everything on loopback, a three-node nats-server
cluster started here (agent/sandbox/nats_cluster.py):

1. offline intake, replication off against on: the real agent
   (``python -m agent run``) with its primary on a dead port, ``--concurrency``
   keep-alive clients POSTing ``--orders`` unique orders; off and on alternate
   twice, as a shared machine drifts. Goal: added p50 <= 2 ms, rate >= 70% of off;
2. takeover: the same ``--takeover`` orders once as a buffer directory and once
   in the replica; ``edge-recover --path DIR --mode merge`` against
   ``edge-recover --from-replica NODE --mode merge``, each into a fresh center
   (bench/center.py, its own process). Goal: replica <= 1.5x the directory.
   Where the takeover's time went is printed from edge-recover's own log
   (listing the replica, the merge with its marks).

Exit 1 if an order is missing or created twice, else 0 whether goals are met or not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.drill.agent_proc import AgentSubprocess, write_config_file  # noqa: E402
from agent.replica.stream import Change, Publisher, ensure_stream  # noqa: E402
from agent.sandbox.nats_cluster import NatsCluster, available, quiet_errors  # noqa: E402
from agent.sandbox.servers import free_port as free_port_on  # noqa: E402
from agent.spool.record import PendingRecord  # noqa: E402
from bench.merge import HOST, free_port, generate, http  # noqa: E402

NODE = "wh-bench"


def agent_sections(work: Path, port: int, servers: list[str] | None) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "agent": {
            "node_id": "wh-intake",
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(work / "state"),
        },
        "buffer": {"path": str(work / "spool"), "scan_interval_s": 30},
        "upstream": {"primary": f"http://127.0.0.9:{free_port_on('127.0.0.9')}/v3"},
        "sms": {"enabled": False},
        "auth": {"tokens_file": ""},
    }
    if servers:
        sections["replication"] = {"enabled": True, "servers": servers, "replicas": 3}
    return sections


async def intake(work: Path, servers: list[str] | None, n: int, conc: int) -> tuple[float, float]:
    """(orders/s, p50 ms) of ``n`` offline orders through a real agent."""
    port = free_port_on("127.0.0.1")
    work.mkdir(parents=True)
    config = write_config_file(work / "agent.toml", agent_sections(work, port, servers))
    agent = AgentSubprocess(config, work / "agent.log", f"http://127.0.0.1:{port}", cwd=ROOT)
    agent.start()
    latencies: list[float] = []
    try:
        conn = aiohttp.TCPConnector(limit=conc)
        async with aiohttp.ClientSession(connector=conn) as session:
            await agent.wait_ready(session, 30)
            queue = list(range(n))
            bad: list[int] = []

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    body = orjson.dumps({"channel_id": "douyin", "channel_order_id": f"b{i}"})
                    t = time.perf_counter()
                    async with session.post(
                        f"{agent.url}/v1/orders",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    ) as r:
                        await r.read()
                        if r.status != 202:
                            bad.append(r.status)
                    latencies.append(time.perf_counter() - t)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            elapsed = time.perf_counter() - start
            if bad:
                raise SystemExit(f"intake: {len(bad)} answers not 202: {sorted(set(bad))}")
    finally:
        agent.kill()
        await agent.reap()
        agent.cleanup()
    return n / elapsed, statistics.median(latencies) * 1000


async def fill_replica(servers: list[str], root: Path) -> int:
    """The directory's records, published into the replica as this node's pending orders."""
    nc = await nats.connect(servers=servers, error_cb=quiet_errors)
    try:
        js = nc.jetstream(timeout=10)
        await ensure_stream(js, 3, 10)
        publisher = Publisher(nc)
        names = sorted(os.listdir(root / "pending"))
        for i in range(0, len(names), 2000):
            changes = [
                Change("pending", PendingRecord.from_bytes((root / "pending" / n).read_bytes()))
                for n in names[i : i + 2000]
            ]
            results = await publisher.publish_all(changes, 10)
            errors = [e for e in results if isinstance(e, BaseException)]
            if errors:
                raise SystemExit(f"filling the replica failed: {errors[0]}")
        return len(names)
    finally:
        await nc.close()


def run_logged(cmd: list[str], log: Path) -> tuple[float, int]:
    """(seconds, exit code) of ``cmd``, its stderr (edge-recover's log) kept in ``log``."""
    start = time.monotonic()
    with log.open("wb") as err:
        code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err).returncode
    return time.monotonic() - start, code


# edge-recover's log lines that say where a run's time went.
PHASES = ("listed in", "merge done in", "elapsed")


def _phases(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return [line.removeprefix("edge-recover: ") for line in lines if any(p in line for p in PHASES)]


def takeover(
    work: Path, servers: list[str], n: int, phases: list[str]
) -> tuple[float, float, list[str]]:
    """(directory merge s, replica takeover s, errors); ``phases``: the log's breakdown."""
    root = work / "dir"
    generate(root, n)
    asyncio.run(fill_replica(servers, root))
    port = free_port()
    base = f"http://{HOST}:{port}/v3"
    center = subprocess.Popen(
        [sys.executable, "-m", "bench.center", HOST, str(port)], cwd=ROOT, stdout=subprocess.PIPE
    )
    errors: list[str] = []
    try:
        assert center.stdout is not None
        center.stdout.readline()
        (work / "other").mkdir()
        config = write_config_file(
            work / "recover.toml",
            {
                "agent": {"node_id": "wh-other", "state_dir": str(work / "other")},
                "upstream": {"primary": base},
                "sms": {"enabled": False},
                "auth": {"tokens_file": ""},
                "replication": {"enabled": True, "servers": servers, "replicas": 3},
            },
        )
        times = []
        for name, cmd in (
            ("directory", ["--path", str(root), "--mode", "merge", "--target", base]),
            ("replica", ["--from-replica", NODE, "--mode", "merge", "--config", str(config),
                         "--target", base, "--path", str(work / "takeover")]),
        ):  # fmt: skip
            http("POST", f"http://{HOST}:{port}/admin/reset")
            log = work / f"recover-{name}.log"
            secs, code = run_logged([sys.executable, "-m", "recovery", *cmd], log)
            stats = http("GET", f"http://{HOST}:{port}/admin/stats")
            if code != 0 or stats["creates"] != n or stats["duplicated_keys"]:
                errors.append(f"{cmd[0]}: exit {code}, {stats}")
            times.append(secs)
            phases.extend(f"  {name}: {line}" for line in _phases(log))
    finally:
        center.terminate()
        center.wait()
    return times[0], times[1], errors


def bench_intake(work: Path, cluster: NatsCluster, args: argparse.Namespace) -> None:
    """Offline intake, replication off against on (alternated), with the verdicts."""
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for i, mode in enumerate(("off", "on", "off", "on")):
        servers = cluster.urls if mode == "on" else None
        runs[mode].append(
            asyncio.run(intake(work / f"intake-{i}", servers, args.orders, args.concurrency))
        )
    off_rate = statistics.mean(r for r, _ in runs["off"])
    on_rate = statistics.mean(r for r, _ in runs["on"])
    off_p50 = statistics.mean(p for _, p in runs["off"])
    on_p50 = statistics.mean(p for _, p in runs["on"])
    print(f"intake, {args.orders} orders, {args.concurrency} clients, cpus {os.cpu_count()}")
    print(f"  replication off: {off_rate:,.0f} orders/s, p50 {off_p50:.2f} ms")
    print(f"  replication on:  {on_rate:,.0f} orders/s, p50 {on_p50:.2f} ms")
    seq = {
        mode: asyncio.run(
            intake(work / f"seq-{mode}", cluster.urls if mode == "on" else None, 300, 1)
        )[1]
        for mode in ("off", "on")
    }
    print(
        f"  one client at a time (300 orders): p50 off {seq['off']:.2f} ms, "
        f"on {seq['on']:.2f} ms, added {seq['on'] - seq['off']:.2f} ms"
    )
    added, ratio = on_p50 - off_p50, on_rate / off_rate
    print(f"  added p50 {added:.2f} ms (goal <= 2): {'PASS' if added <= 2 else 'MISS'}")
    print(f"  rate {ratio:.0%} of off (goal >= 70%): {'PASS' if ratio >= 0.7 else 'MISS'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--takeover", type=int, default=100_000, help="orders taken over")
    p.add_argument("--only", choices=("intake", "takeover"), help="run one half")
    args = p.parse_args()
    if not available():
        print("nats-server is not installed (apt-get install nats-server): skipped")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        work = Path(tmp)
        cluster = NatsCluster(work / "nats")
        cluster.start()
        try:
            asyncio.run(cluster.wait_ready())
            if args.only != "takeover":
                bench_intake(work, cluster, args)
            if args.only == "intake":
                return 0
            phases: list[str] = []
            dir_s, rep_s, errors = takeover(work, cluster.urls, args.takeover, phases)
            print(f"takeover of {args.takeover:,} orders")
            print(f"  directory merge: {dir_s:.1f} s; from the replica: {rep_s:.1f} s")
            print("\n".join(phases))
            factor = rep_s / dir_s
            print(f"  {factor:.2f}x (goal <= 1.5x): {'PASS' if factor <= 1.5 else 'MISS'}")
            for error in errors:
                print(f"  ERROR {error}")
            return 1 if errors else 0
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
