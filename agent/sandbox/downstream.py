"""A TMS, an invoicing system and an ERP on loopback: the systems after the order center.

Used by ``edge-agent drill`` (the ``full-chain`` scenario), ``edge-agent sandbox`` and the
tests of chain verification (CONTRACT 10). One aiohttp app with three route groups,
each with the fault the runbook's authors describe:

- logistics: tracking appears only after a re-push (``POST /tms/repush``);
- invoicing: an invoice is issued ``invoice_lag_s`` after it is first asked for (404
  until then), or on demand (``invoice_ready``, ``invoice_all``), never for the orders
  in ``invoice_never``;
- finance: the ERP posts the amount the order center holds for that order_id, exactly
  as the order carried it (string or number), except one order in ``truncate_every``
  (the decimals cut off: ``"199.10"`` posted as ``"199"``) or on demand
  (``amount_override``); ``erp_status`` makes it answer that status (503: down).

``hang`` makes every route hang (a downstream that never answers).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from agent.sandbox.servers import Listener, SandboxCenter


class RawNumber(str):
    """An amount the ERP writes as a bare JSON number with exactly these digits."""


@dataclass
class Downstream(Listener):
    center: SandboxCenter | None = None  # where the ERP reads what the order carried
    host: str = "127.0.0.5"
    port: int = 0
    centers: list[SandboxCenter] = field(default_factory=list)  # more places to read
    repushed: set[str] = field(default_factory=set)
    repush_works: bool = True  # False: re-pushes are taken, tracking never appears
    repush_calls: Counter[str] = field(default_factory=Counter)
    invoice_ready: set[str] = field(default_factory=set)  # by order_id
    invoice_all: bool = False
    invoice_lag_s: float | None = None  # issued this long after it was first asked for
    invoice_never: set[str] = field(default_factory=set)  # by channel_order_id
    first_asked: dict[str, float] = field(default_factory=dict)
    amount_override: dict[str, Any] = field(default_factory=dict)  # by channel_order_id
    truncate_every: int = 0  # one order in N posted with its decimals cut off
    truncated: dict[str, str] = field(default_factory=dict)  # order_id -> amount posted
    postings_seen: dict[str, bool] = field(default_factory=dict)
    erp_status: int | None = None
    hang: bool = False
    hanging: int = 0
    seen_auth: list[str | None] = field(default_factory=list)  # one entry per request
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        """Forget every order and fault (between drill scenarios)."""
        for records in (
            self.repushed,
            self.invoice_ready,
            self.invoice_never,
            self.first_asked,
            self.amount_override,
            self.truncated,
            self.postings_seen,
            self.repush_calls,
        ):
            records.clear()
        self.seen_auth.clear()
        self.invoice_all = self.hang = False
        self.repush_works = True
        self.erp_status = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/tms/tracks", self._tracks)
        app.router.add_post("/tms/repush", self._repush)
        app.router.add_get("/inv/invoices", self._invoices)
        app.router.add_get("/erp/postings/{order_id}", self._posting)
        return app

    async def _maybe_hang(self, request: web.Request) -> None:
        self.seen_auth.append(request.headers.get("Authorization"))
        if self.hang:
            self.hanging += 1
            try:
                await asyncio.Event().wait()  # until the client gives up or we stop
            finally:
                self.hanging -= 1

    async def _tracks(self, request: web.Request) -> web.Response:
        await self._maybe_hang(request)
        order_no = request.query.get("order_no", "")
        events = [{"code": "PICKED"}] if order_no in self.repushed else []
        return web.json_response({"order_no": order_no, "events": events})

    async def _repush(self, request: web.Request) -> web.Response:
        await self._maybe_hang(request)
        order_no = orjson.loads(await request.read())["order_no"]
        self.repush_calls[order_no] += 1
        if self.repush_works:
            self.repushed.add(order_no)
        return web.json_response({"ok": True})

    async def _invoices(self, request: web.Request) -> web.Response:
        await self._maybe_hang(request)
        order_no = request.query.get("order_no", "")
        if not self._invoiced(order_no):
            return web.json_response({"error": "no invoice yet"}, status=404)
        return web.json_response({"items": [{"invoice_no": f"INV-{order_no}"}]})

    def _invoiced(self, order_id: str) -> bool:
        if self.invoice_never:
            body = self._order_body(order_id)
            if body is not None and body.get("channel_order_id") in self.invoice_never:
                return False
        if self.invoice_all or order_id in self.invoice_ready:
            return True
        if self.invoice_lag_s is None:
            return False
        first = self.first_asked.setdefault(order_id, time.monotonic())
        return time.monotonic() - first >= self.invoice_lag_s

    async def _posting(self, request: web.Request) -> web.Response:
        await self._maybe_hang(request)
        if self.erp_status is not None:
            return web.json_response({"error": "maintenance"}, status=self.erp_status)
        order_id = request.match_info["order_id"]
        body = self._order_body(order_id)
        if body is None:
            return web.json_response({"error": "no posting"}, status=404)
        amount = self.amount_override.get(str(body.get("channel_order_id")), self._amount(body))
        if order_id not in self.postings_seen and self.truncate_every:
            cut = len(self.postings_seen) % self.truncate_every == self.truncate_every - 1
            if cut:
                self.truncated[order_id] = _truncated(amount)
        self.postings_seen[order_id] = True
        amount = self.truncated.get(order_id, amount)
        # The amount exactly as given: a string, or a number written with its digits.
        text = amount if isinstance(amount, RawNumber) else orjson.dumps(amount).decode()
        return web.Response(
            text=f'{{"order_id": "{order_id}", "amount": {text}}}', content_type="application/json"
        )

    @staticmethod
    def _amount(body: dict[str, Any]) -> Any:
        return body.get("total_amount", body.get("amount"))

    def _order_body(self, order_id: str) -> dict[str, Any] | None:
        for center in [c for c in (self.center,) if c is not None] + self.centers:
            for oid, body in list(center.orders.values()):
                if oid == order_id:
                    doc: dict[str, Any] = orjson.loads(body)
                    return doc
        return None


def _truncated(amount: Any) -> Any:
    """The amount with its decimals cut off, as the faulty ERP posts it."""
    try:
        whole = Decimal(str(amount)).to_integral_value(rounding="ROUND_DOWN")
    except InvalidOperation:
        return amount
    return str(whole) if isinstance(amount, str) else int(whole)


def chain_steps(ds: Downstream, amount: str = "/total_amount") -> list[dict[str, Any]]:
    """The logistics / invoice / finance trio of CONTRACT 10 against ``ds``; ``amount``:
    the order body's pointer to the amount finance must have posted."""
    return [
        {
            "name": "logistics",
            "check": f"GET {ds.url}/tms/tracks?order_no={{order_id}}",
            "present": "/events/0",
            "repair": f"POST {ds.url}/tms/repush",
            "repair_body": '{"order_no": "{order_id}"}',
        },
        {
            "name": "invoice",
            "check": f"GET {ds.url}/inv/invoices?order_no={{order_id}}",
            "present": "/items/0/invoice_no",
        },
        {
            "name": "finance",
            "check": f"GET {ds.url}/erp/postings/{{order_id}}",
            "equal": {"/amount": f"{{order:{amount}}}"},
        },
    ]
