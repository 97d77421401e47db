"""A TMS, an invoicing system and an ERP on loopback, for chain verification tests.

One aiohttp app on 127.0.0.5 with three route groups, each with the fault the
runbook's authors describe: tracking that appears only after a re-push, an
invoice that lags (404 until ``invoice_ready``), a finance posting whose amount
was truncated (``amount_override``), a system that answers 503 for a while
(``erp_status``), and, for the intake test, a downstream that hangs (``hang``).
The ERP posts the amount the order center holds for that order_id, exactly as
the order carried it (string or number), unless overridden.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from agent.sandbox.servers import Listener, SandboxCenter


@dataclass
class Downstream(Listener):
    center: SandboxCenter | None = None
    host: str = "127.0.0.5"
    port: int = 0
    repushed: set[str] = field(default_factory=set)
    repush_works: bool = True  # False: re-pushes are taken, tracking never appears
    repush_calls: Counter[str] = field(default_factory=Counter)
    invoice_ready: set[str] = field(default_factory=set)
    invoice_all: bool = False
    amount_override: dict[str, Any] = field(default_factory=dict)  # by channel_order_id
    erp_status: int | None = None
    hang: bool = False
    hanging: int = 0
    seen_auth: list[str | None] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        if not (self.invoice_all or order_no in self.invoice_ready):
            return web.json_response({"error": "no invoice yet"}, status=404)
        return web.json_response({"items": [{"invoice_no": f"INV-{order_no}"}]})

    async def _posting(self, request: web.Request) -> web.Response:
        await self._maybe_hang(request)
        if self.erp_status is not None:
            return web.json_response({"error": "maintenance"}, status=self.erp_status)
        order_id = request.match_info["order_id"]
        body = self._order_body(order_id)
        if body is None:
            return web.json_response({"error": "no posting"}, status=404)
        amount = self.amount_override.get(body["channel_order_id"], body.get("total_amount"))
        # The amount exactly as given: a string, or a number written with its digits.
        text = orjson.dumps(amount).decode() if not isinstance(amount, RawNumber) else amount
        return web.Response(
            text=f'{{"order_id": "{order_id}", "amount": {text}}}', content_type="application/json"
        )

    def _order_body(self, order_id: str) -> dict[str, Any] | None:
        if self.center is None:
            return None
        for oid, body in self.center.orders.values():
            if oid == order_id:
                doc: dict[str, Any] = orjson.loads(body)
                return doc
        return None


class RawNumber(str):
    """An amount the ERP writes as a bare JSON number with exactly these digits."""


def chain_steps(ds: Downstream) -> list[dict[str, Any]]:
    """The logistics / invoice / finance trio of CONTRACT 10 against ``ds``."""
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
            "equal": {"/amount": "{order:/total_amount}"},
        },
    ]


def chain_section(ds: Downstream, **over: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "deadline_h": 1.0,
        "recheck_interval_s": 0.2,
        "timeout_s": 2.0,
        "concurrency": 4,
        "step": chain_steps(ds),
    }
    section.update(over)
    return section
