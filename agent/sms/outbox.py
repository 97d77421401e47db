"""SMS notices for buffered orders: the persistent outbox and its sender (CONTRACT 9).

At most one SMS per serial (DESIGN invariant 7):

* ``on_buffered`` decides the notice's state at once (phone check, and the
  per-phone window kept in memory: ``PhoneWindow``) and queues the serial's
  row to be committed behind the 202, like the journal's row: waiting for the
  outbox's writer, which also commits the sender's rounds with FULL, cost an
  order 7-9 ms at 32 clients (issue 23). The row is written with
  ``synchronous=NORMAL`` in any case; should a crash take it before its
  commit, the start-up backfill queues it again from the order's pending
  file. The serial is the primary key, so there is never a second row, and
  the provider gets the serial as its dedupe id (OutId). No notice is ever
  sent without its row.
* The sender marks a row "sending" durably *before* calling the provider.
  A row still "sending" at start-up was interrupted mid-call: the message may
  have gone out, so it becomes "ambiguous" and is never resent (ops can look
  it up by serial at the provider). An answer-less call ends the same way.
* Only failures that surely sent nothing (refused, 5xx, 429, throttled) are
  retried, with exponential backoff and jitter, until ``give_up_after_s``.
* At start-up every pending/ file with a ``customer_phone`` and no row gets
  one: the files are the truth, the outbox may have missed a crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.base.metrics import Metrics
from agent.base.phones import check, mask
from agent.base.tasks import cancel_and_wait, wait_set
from agent.config import SmsSection
from agent.delivery.pacing import delay as backoff_delay
from agent.errors import (
    OrderFileError,
    PersistError,
    SmsAmbiguous,
    SmsRateLimited,
    SmsRejected,
    SmsTransient,
)
from agent.sms.providers import Notice, SmsProvider
from agent.sms.store import (
    AMBIGUOUS,
    FAILED,
    OPEN,
    QUEUED,
    SENDING,
    SENT,
    SKIPPED,
    STATES,
    SUPPRESSED,
    OutboxStore,
    Row,
    Transition,
    transition,
)
from agent.sms.window import PhoneWindow
from agent.spool.files import list_pending
from agent.spool.reading import read_order_file
from agent.spool.record import BufferDirs, PendingRecord, parse_tolerant

log = logging.getLogger("agent.sms")

PRUNE_EVERY_S = 60.0


class Outbox:
    """Owns the outbox store, the provider and the sender task; ``start()``/``stop()``."""

    def __init__(
        self,
        cfg: SmsSection,
        state_dir: str,
        dirs: BufferDirs,
        provider: SmsProvider,
        metrics: Metrics,
    ) -> None:
        self._cfg = cfg
        self._dirs = dirs
        self._provider = provider
        self._metrics = metrics
        self.store = OutboxStore(state_dir)
        self.counts: Counter[str] = Counter()
        self._window = PhoneWindow()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._retired: list[SmsProvider] = []

    async def reconfigure(self, cfg: SmsSection, provider: SmsProvider | None) -> None:
        """Live reload: new settings, and a new provider when its settings changed.

        The old provider may still be sending; it is closed at stop(), not now.
        """
        if provider is not None:
            await provider.start()
            self._retired.append(self._provider)
            self._provider = provider
        self._cfg = cfg
        self._wakeup.set()

    @property
    def unfinished(self) -> int:
        return sum(self.counts[s] for s in OPEN)

    async def notice(self, serial: str) -> dict[str, Any] | None:
        """One order's SMS notice for lookups (customer service): state, masked phone."""
        row = await self.store.notice_of(serial)
        if row is None:
            return None
        state, phone, reason, updated_at = row
        return {
            "state": state,
            "phone": mask(phone) if phone else None,
            "sent": state == SENT,
            "reason": reason or None,
            "updated_at": updated_at,
        }

    def snapshot(self) -> dict[str, Any]:
        return {"provider": self._provider.name, "by_state": {s: self.counts[s] for s in STATES}}

    async def start(self) -> None:
        await self.store.open()
        interrupted = await self.store.sending_to_ambiguous(
            "the agent stopped while this SMS was being sent; it may have gone out, "
            "so it is not resent (at most one SMS per serial)"
        )
        for serial in interrupted:
            log.warning(
                "SMS for %s is ambiguous: interrupted while sending, not resent",
                serial,
                extra={"serial": serial},
            )
        self.counts = await self.store.counts()
        await self._provider.start()
        await self._backfill()
        self._window.load(await self.store.window(time.time()))
        for state in STATES:
            self._metrics.sms_outbox.labels(state=state).set_function(self._counter(state))
        self._task = asyncio.create_task(self._run(), name="sms-sender")

    def _counter(self, state: str) -> Callable[[], int]:
        return lambda: self.counts[state]

    async def stop(self) -> None:
        """Let in-flight sends finish (bounded by sms.timeout_s), then close."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(self._cfg.timeout_s + 2):
                    await asyncio.shield(self._task)
            except TimeoutError:
                await cancel_and_wait(self._task)
            self._task = None
        for provider in (*self._retired, self._provider):
            await provider.stop()
        self._retired.clear()
        await self.store.close()

    # -- intake ------------------------------------------------------------------------

    async def on_buffered(self, record: PendingRecord) -> str:
        """Intake hook: the order is durable; queue its notice, its row committed behind
        the 202. Never raises, never waits."""
        raw_phone = record.customer_phone
        if raw_phone is None or not self._cfg.enabled:
            return "none"
        serial = record.serial
        checked = check(raw_phone)
        limit = self._cfg.per_phone_per_hour
        if checked.number is None or checked.reason:
            state = SKIPPED
        elif self._window.admit(checked.number, time.time(), limit):
            state = QUEUED
        else:
            state = SUPPRESSED
        try:
            fut = self.store.enqueue_behind(
                serial, checked.number, raw_phone, checked.reason, state, limit
            )
        except RuntimeError as exc:  # the outbox is stopping; start-up queues it again
            log.error("SMS for %s not queued: %s", serial, exc, extra={"serial": serial})
            return "none"
        fut.add_done_callback(lambda f: self._behind_done(f, serial, raw_phone, checked.reason))
        return "queued" if state == QUEUED else "none"

    def _behind_done(
        self, fut: asyncio.Future[str | None], serial: str, raw_phone: str, reason: str
    ) -> None:
        """A row queued by ``on_buffered`` was committed (or not): count and log it."""
        if fut.cancelled() or fut.exception() is not None:
            why = "cancelled" if fut.cancelled() else fut.exception()
            log.error(
                "SMS for %s not recorded in the outbox (%s); the start-up backfill queues "
                "it again from its pending file",
                serial,
                why,
                extra={"serial": serial},
            )
            return
        state = fut.result()
        if state is not None:  # None: the serial had a row already, nothing new
            self._counted_new(serial, raw_phone, state, reason)

    async def _enqueue(self, serial: str, raw_phone: str) -> str:
        checked = check(raw_phone)
        state, new = await self.store.enqueue(
            serial, checked.number, raw_phone, checked.reason, self._cfg.per_phone_per_hour
        )
        if new:
            self._counted_new(serial, raw_phone, state, checked.reason)
        return state

    def _counted_new(self, serial: str, raw_phone: str, state: str, reason: str) -> None:
        self.counts[state] += 1
        if state == QUEUED:
            # debug: one line per buffered order on the intake path cost ~15% of its
            # CPU; the "sent" (or failed/ambiguous) line follows from the sender. Its
            # fields only when it is written: masking the phone costs ~5 us.
            if log.isEnabledFor(logging.DEBUG):
                log.debug("SMS for %s queued", serial, extra=self._extra(serial, raw_phone, state))
            self._wakeup.set()
            return
        log.warning(
            "SMS for %s %s: %s",
            serial,
            state,
            reason or "sms.per_phone_per_hour reached",
            extra=self._extra(serial, raw_phone, state),
        )

    @staticmethod
    def _extra(serial: str, raw_phone: str, state: str) -> dict[str, str]:
        return {"serial": serial, "phone": mask(raw_phone), "sms_state": state}

    async def _backfill(self) -> None:
        """Pending files younger than give_up_after_s with a phone and no row get one."""
        known = await self.store.serials()
        horizon = time.time() - self._cfg.give_up_after_s
        for record in await asyncio.to_thread(_unnotified, self._dirs, known, horizon):
            phone = record.customer_phone or ""
            if self.store.rebuilt is not None:
                # The damaged outbox may have sent this notice: never risk a second one.
                await self.store.enqueue(
                    record.serial,
                    None,
                    phone,
                    "the SMS outbox was damaged and rebuilt; "
                    "whether this notice went out is unknown, so it is not sent again",
                    0,
                    state=AMBIGUOUS,
                )
                self.counts[AMBIGUOUS] += 1
                log.warning(
                    "SMS for %s ambiguous: the outbox was rebuilt, not resent",
                    record.serial,
                    extra={"serial": record.serial},
                )
                continue
            log.warning(
                "pending %s has a phone but no SMS outbox row; adding it",
                record.serial,
                extra={"serial": record.serial},
            )
            await self._enqueue(record.serial, phone)

    # -- sender ------------------------------------------------------------------------

    async def _run(self) -> None:
        """Rounds of up to ``sms.concurrency`` notices; one FULL commit per round records
        the last round's outcomes and marks the next round "sending" before it is sent."""
        last_prune = 0.0
        done: list[Transition] = []
        nxt: float | None
        while True:
            self._wakeup.clear()
            try:
                now = time.time()
                if now - last_prune > PRUNE_EVERY_S:
                    await self.store.prune_window()
                    self._window.prune(now)
                    last_prune = now
                claimed = await self.store.claim(
                    done,
                    now,
                    0 if self._stopping else self._cfg.concurrency,
                    now - self._cfg.give_up_after_s,
                )
            except PersistError as exc:
                for update in done:  # on disk these stay "sending": ambiguous at start-up
                    log.error(
                        "SMS for %s: cannot record %s: %s",
                        update.serial,
                        update.state,
                        exc,
                        extra={"serial": update.serial},
                    )
                log.error("SMS outbox: %s; retrying in 1s", exc)
                done, nxt = [], time.time() + 1.0
            else:
                self._recorded(done)
                for row in claimed.expired:
                    self._moved(QUEUED, FAILED)
                    self._finished(
                        transition(
                            row, QUEUED, FAILED, reason="not sent within sms.give_up_after_s"
                        )
                    )
                for _ in claimed.rows:
                    self._moved(QUEUED, SENDING)
                done = list(await asyncio.gather(*(self._send_one(r) for r in claimed.rows)))
                if done or claimed.expired:
                    continue  # record them, and look for more
                if self._stopping:
                    return
                nxt = claimed.next_due
            delay = (
                PRUNE_EVERY_S if nxt is None else min(max(0.0, nxt - time.time()), PRUNE_EVERY_S)
            )
            await wait_set(self._wakeup, delay)

    async def _send_one(self, row: Row) -> Transition:
        """Send one notice whose "sending" mark is durable; return how its row moves on."""
        text = self._cfg.template.format(SN=row.serial, sign_name=self._cfg.sign_name)
        notice = Notice(row.serial, row.phone, self._cfg.sign_name, self._cfg.template, text)
        try:
            provider_id = await self._provider.send(notice)
        except SmsRateLimited as exc:
            return self._retry(row, exc, self._cfg.rate_limited_pause_s)
        except SmsTransient as exc:
            return self._retry(row, exc, 0.0)
        except SmsRejected as exc:
            return transition(row, SENDING, FAILED, reason=str(exc))
        except SmsAmbiguous as exc:
            return transition(row, SENDING, AMBIGUOUS, reason=f"{exc}; not resent")
        except Exception as exc:  # a bug: we cannot know whether it went out
            log.error("SMS for %s: unexpected provider error", row.serial, exc_info=True)
            return transition(
                row, SENDING, AMBIGUOUS, reason=f"unexpected error {exc!r}; not resent"
            )
        return transition(row, SENDING, SENT, provider_id=provider_id)

    def _retry(self, row: Row, exc: Exception, at_least: float) -> Transition:
        delay = backoff_delay(
            row.attempts, self._cfg.retry_initial_s, self._cfg.retry_max_s, at_least
        )
        if time.time() + delay - row.created_at > self._cfg.give_up_after_s:
            return transition(
                row, SENDING, FAILED, reason=f"gave up after {row.attempts} attempts: {exc}"
            )
        log.info(
            "SMS for %s not sent (%s); retry in %.1fs",
            row.serial,
            exc,
            delay,
            extra={"serial": row.serial, "phone": mask(row.phone)},
        )
        return transition(row, SENDING, QUEUED, reason=str(exc), next_at=time.time() + delay)

    def _recorded(self, done: list[Transition]) -> None:
        """The last round's transitions are committed: count and log those that applied."""
        for update in done:
            if update.inserted:
                self._moved(update.only_from, update.state)
                self._finished(update)

    def _finished(self, update: Transition) -> None:
        if update.state == QUEUED:
            return  # a retry, logged when it was decided
        extra = {
            "serial": update.serial,
            "phone": mask(update.phone),
            "sms_state": update.state,
            "attempts": update.attempts,
        }
        if update.state == SENT:
            self._metrics.sms_sent.inc()
            log.info("SMS for %s sent via %s", update.serial, self._provider.name, extra=extra)
            return
        if update.state == FAILED:
            self._metrics.sms_failed.inc()
        log.warning("SMS for %s %s: %s", update.serial, update.state, update.reason, extra=extra)

    def _moved(self, from_state: str, to_state: str) -> None:
        self.counts[from_state] -= 1
        self.counts[to_state] += 1


def _unnotified(dirs: BufferDirs, known: set[str], horizon: float) -> list[PendingRecord]:
    """Pending records written after ``horizon`` with a phone and no outbox row."""
    out = []
    for name, _ in list_pending(dirs):
        if name[: -len(".json")] in known:
            continue
        path = dirs.pending / name
        try:
            if os.stat(path).st_mtime < horizon:
                continue  # too late for a "we got your order" notice
            record = parse_tolerant(read_order_file(path, follow_symlinks=False), str(path))
        except (OSError, OrderFileError):
            continue  # the drain quarantines what cannot be read
        if record.customer_phone is not None and record.serial not in known:
            out.append(record)
    return out
