"""The verifier: checks every outage order's steps until each is verified or reported.

An owned component (``start()``/``stop()``) with one task set: the check loop,
the merged/ scan, and the checks in flight (at most ``chain.concurrency``), all
cancelled on shutdown. It never slows intake: enrolment (``on_created``,
``on_merged``) only queues a ledger row behind the reply and returns; a failed
ledger write is logged and the merged/ scan catches up. Checks go out on the
verifier's own ClientSession, never the order path's.

What an answer does to a step (CONTRACT 10): verified; pending (not yet: the
``repair`` is asked, at most once per recheck interval); failed (a mismatch, or
a 4xx other than 404/408/429: reported with both values, rechecked each
interval, turns verified once the record downstream is corrected); retry (5xx,
timeout, refused: the state stays as it was, never failed). Every outstanding
step is rechecked every ``recheck_interval_s`` with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp

from agent.base.tasks import cancel_and_wait, wait_set
from agent.chain.enrol import (
    STANDBY,
    FindOrderId,
    Found,
    from_order,
    from_record,
    read_merged,
    timestamp,
    unknown_merged,
)
from agent.chain.judge import Verdict, judge, settle
from agent.chain.ledger import LEDGER_NAME, Due, Ledger
from agent.chain.steps import ChainOrder, Outcome, StepCheck, build_steps, load_plugins
from agent.config import ChainSection
from agent.errors import CorruptRecordError, PersistError
from agent.orders import Order
from agent.spool.record import BufferDirs, PendingRecord
from agent.state.journal import Journal

log = logging.getLogger("agent.chain")
SCAN_BATCH = 2000  # merged/ files read per round of the scan


class Verifier:
    def __init__(
        self,
        cfg: ChainSection,
        state_dir: str,
        dirs: BufferDirs,
        journal: Journal,
        scan_interval_s: float,
        find_order_id: FindOrderId | None = None,
    ) -> None:
        self.cfg = cfg
        self._find_order_id = find_order_id
        self._dirs = dirs
        self._journal = journal
        self._scan_interval_s = scan_interval_s
        self._plugins = load_plugins(cfg.steps)  # ConfigError now, not at the first check
        self.ledger = Ledger(Path(state_dir) / LEDGER_NAME, [s.name for s in cfg.steps])
        self._session: aiohttp.ClientSession | None = None
        self._steps: dict[str, StepCheck] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._wake = asyncio.Event()
        self._known: set[str] = set()  # serials enrolled (or queued to be)
        self._unreadable: set[str] = set()  # merged/ names that are no order: read once
        self.in_flight: set[tuple[str, str]] = set()  # (serial, step) being checked now
        self.checks = 0  # checks finished since start
        # (serial, step) -> ``checks`` when its check ended: a ledger read begun before
        # then may still show the step due (see _check_loop).
        self._ended: dict[tuple[str, str], int] = {}
        self._running = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.ledger.start()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.cfg.concurrency),
        )
        self._steps = {s.name: s for s in build_steps(self.cfg.steps, self._session, self._plugins)}
        self._known = await self.ledger.serials()
        self._running = True
        if self.ledger.fresh:
            await self._from_journal()
        self._spawn(self._check_loop(), "chain-checks")
        self._spawn(self._scan_loop(), "chain-scan")
        log.info(
            "chain verification on: %d steps, %d orders in the ledger",
            len(self._steps),
            len(self._known),
        )

    async def stop(self) -> None:
        self._running = False
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.ledger.stop()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- enrolment (never waits, never raises) -------------------------------------------

    def on_created(
        self, order: Order, serial: str, received_at: str, cluster: str, order_id: Any
    ) -> None:
        """The forward path created an order: the standby's are outage orders."""
        if cluster != STANDBY:
            return
        self._enrol(Found(from_order(order, serial, received_at, order_id), time.time()), "standby")

    def on_merged(self, record: PendingRecord, order_id: Any, cluster: str) -> None:
        """The drain delivered a buffered order."""
        self._enrol(Found(from_record(record, order_id), time.time()), "drain")

    def _enrol(self, found: Found, source: str) -> None:
        serial = found.order.serial
        if serial in self._known or not self._running:
            return  # already there; or not running: the merged/ scan will find it
        try:
            future = self.ledger.enrol(found.order, found.delivered_at, source)
        except RuntimeError as exc:  # stopping
            log.warning("chain: %s not enrolled (%s); the merged/ scan will", serial, exc)
            return
        self._known.add(serial)

        def committed(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                self._known.discard(serial)
                log.error(
                    "chain: ledger row for %s not stored (%s); the merged/ scan enrols it again",
                    serial,
                    "cancelled" if done.cancelled() else done.exception(),
                )
            else:
                self._wake.set()

        future.add_done_callback(committed)

    async def _from_journal(self) -> None:
        """A new (or rebuilt) ledger: the standby's orders the journal still knows.

        The journal keeps no order body: a check that needs ``{order:...}`` reports it.
        """
        try:
            entries = await self._journal.forwarded_to(STANDBY)
        except PersistError as exc:
            log.error("chain: cannot read the journal to rebuild the ledger: %s", exc)
            return
        for e in entries:
            if e.serial in self._known:
                continue
            order = ChainOrder(
                serial=e.serial,
                order_id=e.order_id,
                dedupe_key=e.dedupe_key,
                channel_id=None,
                channel_order_id=None,
                received_at=e.received_at,
                body=None,
            )
            self._enrol(Found(order, timestamp(e.received_at, time.time())), "journal")
        if entries:
            log.info("chain: %d standby orders from the journal", len(entries))

    async def scan_merged(self) -> int:
        """Enrol merged/ files not in the ledger; how many were enrolled."""
        enrolled = 0
        while True:
            names = await asyncio.to_thread(
                unknown_merged, self._dirs, self._known, self._unreadable, SCAN_BATCH
            )
            if not names:
                return enrolled
            found = await asyncio.to_thread(self._read_all, names)
            waits = []
            for item in found:
                order = item.order
                if order.order_id is None:  # the copy kept none (disk full): the journal
                    entry = await self._journal.by_serial(order.serial)
                    if entry is not None and entry.order_id is not None:
                        order = dataclasses.replace(order, order_id=entry.order_id)
                waits.append(self.ledger.enrol(order, item.delivered_at, "merged"))
                self._known.add(order.serial)
            results = await asyncio.gather(*waits, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                for item in found:
                    self._known.discard(item.order.serial)
                raise PersistError(f"chain ledger: {errors[0]}")
            enrolled += len(found)
            self._wake.set()

    def _read_all(self, names: list[str]) -> list[Found]:
        found = []
        for name in names:
            try:
                found.append(read_merged(self._dirs, name))
            except CorruptRecordError as exc:
                self._unreadable.add(name)
                log.warning("chain: merged/%s is not an order record, not verified: %s", name, exc)
        return found

    async def _scan_loop(self) -> None:
        while True:
            try:
                n = await self.scan_merged()
                if n:
                    log.info("chain: %d orders enrolled from merged/", n)
            except (PersistError, OSError) as exc:
                log.error(
                    "chain: merged/ scan failed: %s; next scan in %.0fs", exc, self._scan_interval_s
                )
            await asyncio.sleep(self._scan_interval_s)

    # -- checks --------------------------------------------------------------------------

    async def _check_loop(self) -> None:
        batch = 2 * self.cfg.concurrency  # in flight <= concurrency: at least that many new
        while True:
            # Cleared before the ledger is read, never after: a wake-up (an enrolment
            # committed, a check done) that comes while we look is then never lost.
            self._wake.clear()
            read_from = self.checks
            try:
                due = await self.ledger.due(time.time(), batch)
            except PersistError as exc:
                log.error(
                    "chain: cannot read the ledger: %s; trying again in %.1fs",
                    exc,
                    self.cfg.recheck_interval_s,
                )
                await asyncio.sleep(self.cfg.recheck_interval_s)
                continue
            # A check that ended while we read has its result committed, but the read may
            # be older than that commit: taken from it, the step would be checked (and its
            # repair asked) again at once. Left out here, it comes from the next read.
            fresh = [
                d
                for d in due
                if d.key not in self.in_flight and self._ended.get(d.key, 0) <= read_from
            ]
            # Every read from now on began after these ends: nothing left to guard.
            self._ended = {k: n for k, n in self._ended.items() if n > read_from}
            for item in fresh:
                await self._slots.acquire()
                self.in_flight.add(item.key)
                self._spawn(self._run(item), f"chain-check:{item.step}:{item.order.serial}")
            if not fresh:
                await self._idle(bool(due))

    async def _idle(self, busy: bool) -> None:
        """Wait for a check to finish or an enrolment (busy), else until the next due."""
        timeout = self.cfg.recheck_interval_s
        if not busy:
            with contextlib.suppress(PersistError):
                nxt = await self.ledger.next_check()
                if nxt is not None:
                    timeout = min(timeout, max(0.0, nxt - time.time()))
        await wait_set(self._wake, timeout)

    async def _run(self, item: Due) -> None:
        try:
            await self.check_one(item)
        except PersistError as exc:
            log.error("chain: result for %s %s not stored: %s", item.order.serial, item.step, exc)
        except Exception as exc:  # a bug in one check never stops the others
            log.exception("chain: check of %s %s failed: %s", item.order.serial, item.step, exc)
        finally:
            self.checks += 1
            self._ended[item.key] = self.checks
            self.in_flight.discard(item.key)
            self._slots.release()
            self._wake.set()

    async def check_one(self, item: Due) -> None:
        """Check one step of one order, ask its repair if due, store the result."""
        interval = self.cfg.recheck_interval_s
        if item.order.order_id is None and self._find_order_id is not None:
            order_id = await self._find_order_id(item.order.dedupe_key)
            if order_id is None:
                detail = "order_id not known yet: asking the center again at the next recheck"
                verdict = Verdict(Outcome.RETRY, item.state, detail, item.last_repair)
                await settle(self.ledger, item, verdict, interval)
                return
            await self.ledger.set_order_id(item.order.serial, order_id)
            order = dataclasses.replace(item.order, order_id=order_id)
            item = dataclasses.replace(item, order=order)
        verdict = await judge(self._steps[item.step], item, interval)
        await settle(self.ledger, item, verdict, interval)

    # -- views ---------------------------------------------------------------------------

    async def chain_of(self, serial: str) -> dict[str, str] | None:
        """step -> state for an outage order, None for any other order."""
        steps = await self.ledger.chain_of(serial, self.cfg.deadline_s)
        return {name: v["state"] for name, v in steps.items()} or None

    async def counts(self) -> dict[str, dict[str, int]]:
        return self.ledger.counts(self.cfg.deadline_s)

    async def prune(self, keep_s: float) -> int:
        """Forget finished orders delivered more than ``keep_s`` ago (the merged/ retention)
        whose merged/ copy is gone: one still there would be enrolled again by the scan,
        and housekeeping expires it first. How many were forgotten."""
        merged = self._dirs.merged

        def present(serials: list[str]) -> set[str]:
            return {s for s in serials if (merged / f"{s}.json").exists()}

        gone = await self.ledger.prune(
            time.time() - keep_s, lambda serials: asyncio.to_thread(present, serials)
        )
        self._known.difference_update(gone)
        return len(gone)

    async def finished(self) -> set[str]:
        return await self.ledger.finished()
