"""``--mode chain``: the agent's chain checks (CONTRACT 10), run once over DIR/merged.

For a buffer merged on another machine: every merged/ copy is enrolled in a ledger
kept in DIR (``.edge-recover-chain.sqlite3``, never read as an order), then every
step not yet verified is checked once, with the agent's own step code (agent/chain:
steps, judge, ledger). A rerun enrols only new copies and checks only what is still
outstanding; a repair is asked at most once per ``recheck_interval_s`` across runs.
A 5xx, timeout or refused connection is tried again a few times in the run; a step
whose last try got no usable answer counts as unreachable, never failed.

Exit codes: 0 every step verified; 1 some step failed or overdue (listed), or the
run was interrupted; 4 some steps still pending within the deadline (run again
later); 3 a step's system unreachable and nothing failed; 2 usage or config (cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.chain.enrol import read_merged, unknown_merged
from agent.chain.judge import judge, settle
from agent.chain.ledger import Due, Ledger, shown_state
from agent.chain.states import FAILED, OVERDUE, PENDING, STATES
from agent.chain.steps import Outcome, PluginStep, StepCheck, build_steps
from agent.config import ChainSection
from agent.delivery.pacing import delay
from agent.errors import CorruptRecordError
from agent.spool.record import BufferDirs
from recovery.progress import Progress
from recovery.report import Summary, write_report

log = logging.getLogger("recovery.chain")

LEDGER_FILE = ".edge-recover-chain.sqlite3"
EXIT_OK, EXIT_PROBLEMS, EXIT_UNREACHABLE, EXIT_PENDING = 0, 1, 3, 4
TRIES = 3  # per step and order in one run, when the system does not answer usefully
PAGE = 500  # outstanding steps read from the ledger at once
ENROL_BATCH = 2000
SHOWN = 50  # problems printed; all of them are in --report


@dataclass(frozen=True)
class ChainJob:
    root: Path
    cfg: ChainSection
    plugins: dict[str, PluginStep]
    concurrency: int
    report: Path | None
    source: str  # the config file the steps come from


async def run_chain(job: ChainJob, stop: asyncio.Event) -> int:
    # The agent logs each change of state (its journal keeps them); here the summary and
    # the report do, and 300,000 lines on stderr would bury the progress. Failures stay.
    logging.getLogger("agent.chain").setLevel(logging.WARNING)
    names = [s.name for s in job.cfg.steps]
    ledger = Ledger(job.root / LEDGER_FILE, names)
    await ledger.start()
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=job.cfg.timeout_s),
        connector=aiohttp.TCPConnector(limit=job.concurrency),
    )
    summary = Summary("chain", job.source, outcomes=STATES)
    run = _Run(job, ledger, {s.name: s for s in build_steps(job.cfg.steps, session, job.plugins)})
    try:
        summary.extra["enrolled"] = await _enrol(BufferDirs(job.root), ledger, stop)
        before = ledger.counts(job.cfg.deadline_s)
        todo = sum(n for c in before.values() for k, n in c.items() if k != "verified")
        log.info("%d orders in the ledger, %d steps to check", len(await ledger.serials()), todo)
        run.progress = Progress(todo, "chain")
        await run.all_outstanding(stop)
        run.progress.close()
        counts = ledger.counts(job.cfg.deadline_s)
        problems = await ledger.problems(job.cfg.deadline_s, limit=SHOWN)
        summary.total = len(await ledger.serials())
    finally:
        await session.close()
        await ledger.stop()
    for per_step in counts.values():
        for state, n in per_step.items():
            summary.add(state, n)
    summary.finish()
    summary.extra.update(
        steps=counts,
        checked=run.checked,
        unreachable=dict(run.unreachable),
        interrupted=stop.is_set(),
    )
    _print(summary, counts, problems, run)
    if job.report is not None:
        entries = _entries(job.root / LEDGER_FILE, names, job.cfg.deadline_s)
        await asyncio.to_thread(write_report, job.report, summary.as_dict(), "orders", entries)
    return _exit_code(counts, run, stop)


def _exit_code(counts: dict[str, dict[str, int]], run: _Run, stop: asyncio.Event) -> int:
    if stop.is_set():
        log.warning("interrupted: %d steps checked; run again to resume", run.checked)
        return EXIT_PROBLEMS
    if any(c[FAILED] or c[OVERDUE] for c in counts.values()):
        return EXIT_PROBLEMS
    if run.unreachable:
        return EXIT_UNREACHABLE
    if any(c[PENDING] for c in counts.values()):
        return EXIT_PENDING
    return EXIT_OK


async def _enrol(dirs: BufferDirs, ledger: Ledger, stop: asyncio.Event) -> int:
    """Every merged/ copy not in the ledger yet gets its place (committed durably)."""
    known = await ledger.serials()
    names = await asyncio.to_thread(unknown_merged, dirs, known, (), 1 << 62)
    enrolled = 0
    for i in range(0, len(names), ENROL_BATCH):
        if stop.is_set():
            break
        found, bad = await asyncio.to_thread(_read_all, dirs, names[i : i + ENROL_BATCH])
        for name, error in bad:
            log.warning("merged/%s is not an order record, not verified: %s", name, error)
        await asyncio.gather(*(ledger.enrol(f.order, f.delivered_at, "merged") for f in found))
        enrolled += len(found)
    if enrolled:
        log.info("%d merged/ orders enrolled in %s", enrolled, ledger.path)
    return enrolled


def _read_all(dirs: BufferDirs, names: list[str]) -> tuple[list[Any], list[tuple[str, str]]]:
    found, bad = [], []
    for name in names:
        try:
            found.append(read_merged(dirs, name))
        except CorruptRecordError as exc:
            bad.append((name, str(exc)))
    return found, bad


class _Run:
    """One pass over the outstanding steps, at most ``concurrency`` checks in flight."""

    def __init__(self, job: ChainJob, ledger: Ledger, steps: dict[str, StepCheck]) -> None:
        self._job = job
        self._ledger = ledger
        self._steps = steps
        self.progress: Progress | None = None
        self.checked = 0
        self.unreachable: Counter[str] = Counter()  # step -> checks whose last try got nothing
        self.last_unreachable: dict[str, str] = {}

    async def all_outstanding(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[Due | None] = asyncio.Queue(self._job.concurrency * 4)
        async with asyncio.TaskGroup() as workers:
            for _ in range(self._job.concurrency):
                workers.create_task(self._worker(queue, stop))
            after = ("", "")
            while not stop.is_set():
                page = await self._ledger.outstanding(after, PAGE)
                if not page:
                    break
                for item in page:
                    if stop.is_set():
                        break
                    await queue.put(item)
                after = page[-1].key
            for _ in range(self._job.concurrency):
                await queue.put(None)

    async def _worker(self, queue: asyncio.Queue[Due | None], stop: asyncio.Event) -> None:
        interval = self._job.cfg.recheck_interval_s
        while (item := await queue.get()) is not None:
            if stop.is_set():
                continue
            step = self._steps[item.step]
            for attempt in range(TRIES):
                verdict = await judge(step, item, interval)
                if verdict.outcome is not Outcome.RETRY or attempt == TRIES - 1 or stop.is_set():
                    break
                await asyncio.sleep(delay(attempt + 1, 0.2, 2.0))
            if verdict.outcome is Outcome.RETRY:
                self.unreachable[item.step] += 1
                self.last_unreachable[item.step] = verdict.detail
            await settle(self._ledger, item, verdict, interval)
            self.checked += 1
            if self.progress is not None:
                self.progress.update(1)


def _print(
    summary: Summary, counts: dict[str, dict[str, int]], problems: list[dict[str, Any]], run: _Run
) -> None:
    print(f"edge-recover chain: {summary.line()}", flush=True)
    for step, c in counts.items():
        print(f"  {step}: " + ", ".join(f"{state} {c[state]}" for state in STATES), flush=True)
    for step, n in run.unreachable.items():
        print(
            f"  unreachable {step}: {n} checks got no usable answer ({run.last_unreachable[step]})",
            flush=True,
        )
    bad = sum(c[FAILED] + c[OVERDUE] for c in counts.values())
    for p in problems:
        print(
            f"  {p['state']} {p['step']}: {p['serial']} (order {p['order_id']}, "
            f"{p['dedupe_key']}): {p['detail']}",
            flush=True,
        )
    if bad > len(problems):
        print(f"  ... ({bad - len(problems)} more in the report)", flush=True)


def _entries(path: Path, steps: list[str], deadline_s: float) -> Iterator[dict[str, Any]]:
    """Every order with every step's state and detail (the values), read as a stream."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT o.serial, o.order_id, o.dedupe_key, o.delivered_at, s.step, s.state, "
            "s.detail FROM orders o JOIN steps s ON s.serial = o.serial ORDER BY o.serial"
        )
        now = time.time()
        entry: dict[str, Any] | None = None
        for serial, order_id, key, delivered_at, step, state, detail in rows:
            if step not in steps:
                continue
            if entry is None or entry["serial"] != serial:
                if entry is not None:
                    yield entry
                entry = {
                    "serial": serial,
                    "order_id": order_id,
                    "dedupe_key": key,
                    "delivered_at": delivered_at,
                    "steps": {},
                }
            entry["steps"][step] = {
                "state": shown_state(state, delivered_at, deadline_s, now),
                "detail": detail,
            }
        if entry is not None:
            yield entry
    finally:
        conn.close()
