"""Sending orders to the target: bulk where the center has it, single POSTs otherwise.

The first bulk request is the probe: it goes alone, and a 404/405/501 turns
bulk off for the rest of the run (its items then go as single POSTs). Every
answer comes back per item (an ``Answer`` or the ``UpstreamError`` of its request), and
the merge asks ``agent.delivery.decide`` what each means, so a partly accepted batch
retries only the items that need it. Requests are
paced (``--rate``, slower on 429/503) and bounded (``--concurrency``).
"""

from __future__ import annotations

import asyncio
import logging
import math

from agent.delivery.pacing import Pacer
from agent.errors import UpstreamError
from agent.upstream.answers import SLOW_DOWN_STATUSES, Answer, BatchItem, Outcome
from agent.upstream.client import UpstreamClient

log = logging.getLogger("recovery.sender")


# One item's result: the center's answer, or why none came.
class NotSent:
    """The run was stopped before this item's request left: nothing was sent."""

    def __repr__(self) -> str:
        return "NotSent()"


NOT_SENT = NotSent()
ItemResult = Answer | UpstreamError | NotSent


class Sender:
    def __init__(
        self,
        client: UpstreamClient,
        base: str,
        concurrency: int,
        rate: float | None,
        batch: int,
        timeout_s: float,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._client = client
        # Set by the first SIGINT/SIGTERM: a request not yet on the wire is not sent (its
        # item comes back NOT_SENT); those already sent finish and are settled.
        self._stop = stop or asyncio.Event()
        self._base = base
        self._slots = asyncio.Semaphore(concurrency)
        self._pacer = Pacer(rate if rate else math.inf)
        self._timeout_s = timeout_s
        self._batch_timeout_s = max(timeout_s, 30.0)
        self.bulk: bool | None = None if batch > 1 else False
        self._probe = asyncio.Lock()
        self.requests = 0

    async def send(self, items: list[BatchItem]) -> list[ItemResult]:
        if len(items) > 1 and self.bulk is not False:
            if self.bulk is None:
                async with self._probe:
                    if self.bulk is None:
                        return await self._probe_bulk(items)
            if self.bulk:
                results = await self._send_batch(items)
                if results is not None:
                    return results
        if len(items) == 1:  # single POSTs: no task per request
            return [await self._send_one(items[0])]
        return list(await asyncio.gather(*(self._send_one(i) for i in items)))

    async def _probe_bulk(self, items: list[BatchItem]) -> list[ItemResult]:
        results = await self._send_batch(items, probing=True)
        if results is None:
            return list(await asyncio.gather(*(self._send_one(i) for i in items)))
        return results

    async def _send_batch(
        self, items: list[BatchItem], probing: bool = False
    ) -> list[ItemResult] | None:
        """Per-item results, or None: send these items one by one instead."""
        if not await self._pacer.wait(len(items), self._stop):
            return [NOT_SENT] * len(items)
        async with self._slots:
            if self._stop.is_set():
                return [NOT_SENT] * len(items)
            self.requests += 1
            try:
                answer = await self._client.post_batch(self._base, items, self._batch_timeout_s)
            except UpstreamError as exc:
                if probing:
                    # No verdict on bulk yet; the next batch probes again.
                    log.info("bulk probe got no answer: %s", exc)
                return [exc] * len(items)
        if answer.unsupported:
            if self.bulk is not False:
                log.info(
                    "the target has no bulk import (HTTP %d to orders:batch): "
                    "single POSTs from now on",
                    answer.status,
                )
            self.bulk = False
            return None
        if answer.answers is None:
            whole = Answer(answer.status, None, answer.retry_after_s, answer.error)
            self._observe(whole)
            if whole.outcome in (Outcome.RETRY, Outcome.UNCLEAR):
                return [whole] * len(items)
            # The center refused the request as a whole (e.g. 400, 413): let each
            # order get its own verdict.
            log.info(
                "orders:batch answered HTTP %d; sending these %d orders singly",
                answer.status,
                len(items),
            )
            return None
        self.bulk = True
        for a in answer.answers:
            self._observe(a)
        return list(answer.answers)

    async def _send_one(self, item: BatchItem) -> ItemResult:
        if not await self._pacer.wait(1, self._stop):
            return NOT_SENT
        async with self._slots:
            if self._stop.is_set():
                return NOT_SENT
            self.requests += 1
            try:
                answer = await self._client.post_order(
                    self._base,
                    item.body.encode("utf-8"),
                    item.idempotency_key,
                    item.serial,
                    self._timeout_s,
                )
            except UpstreamError as exc:
                return exc
        self._observe(answer)
        return answer

    def _observe(self, answer: Answer) -> None:
        if answer.status in SLOW_DOWN_STATUSES:
            self._pacer.slow_down(answer.retry_after_s)
        elif self._pacer.rate != self._pacer.base_rate and answer.outcome.delivered:
            self._pacer.speed_up()
