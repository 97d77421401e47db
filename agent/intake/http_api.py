"""The agent's HTTP API (CONTRACT section 4): thin handlers over the intake and journal."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from agent import console
from agent.base.metrics import CONTENT_TYPE, Metrics
from agent.config import AgentSection
from agent.errors import UpstreamError
from agent.intake.body import BodyTimeout, BodyTooLarge, read_body
from agent.intake.orders import Intake
from agent.state.journal import Entry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StatusSource = Callable[[], Awaitable[dict[str, Any]]]
ReadySource = Callable[[], bool]
Refresh = Callable[[], Awaitable[None]]
SmsLookup = Callable[[str], Awaitable[dict[str, Any] | None]]
ChainLookup = Callable[[str], Awaitable[dict[str, str] | None]]
# Failed and overdue chain steps with what was wrong, oldest first, at most N.
ChainProblems = Callable[[int], Awaitable[list[dict[str, Any]]]]
CHAIN_PROBLEMS_LIMIT = 200
log = logging.getLogger("agent.http")
# Headers we read; a value that is not valid UTF-8 is a 400 naming the header.
READ_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key")


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


class HttpApi:
    def __init__(
        self,
        intake: Intake,
        metrics: Metrics,
        tokens: frozenset[str],
        settings: AgentSection,
        status: StatusSource,
        ready: ReadySource,
        refresh_metrics: Refresh,
        sms_lookup: SmsLookup | None = None,
        chain_lookup: ChainLookup | None = None,
        chain_problems: ChainProblems | None = None,
    ) -> None:
        self._intake = intake
        self._metrics = metrics
        self.tokens = tokens
        self._max_body = settings.max_body_bytes
        self._body_timeout_s = settings.body_timeout_s
        self._status = status
        self._ready = ready
        self._refresh_metrics = refresh_metrics
        self._sms_lookup = sms_lookup
        self._chain_lookup = chain_lookup
        self._chain_problems = chain_problems

    def build_app(self) -> web.Application:
        # Bodies are read by hand below, so aiohttp's own limit only guards the rest.
        # One middleware, not three: every middleware is a coroutine layer (and aiohttp
        # adds one more whenever there is any) on every request, the hot POST included.
        app = web.Application(middlewares=[self._front], client_max_size=self._max_body + 1)
        app.router.add_post("/v1/orders", self.post_order)
        app.router.add_get("/v1/orders/by-key/{key:.+}", self.get_by_key)
        app.router.add_get("/v1/orders/{serial}", self.get_by_serial)
        app.router.add_get("/v1/chain/problems", self.chain_problems)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        # The console (agent/console/): open like the probes; its data calls carry the token.
        app.router.add_get("/", self.console_page)
        app.router.add_get("/console/{name}", self.console_asset)
        return app

    @web.middleware
    async def _front(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Header checks, auth, and every error answer as JSON (aiohttp's 404/405 too)."""
        try:
            refusal = self._check_headers(request) or self._check_auth(request)
            if refusal is not None:
                return refusal
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_response(exc.status, {"error": exc.reason})
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: there is no one to answer
        except Exception as exc:  # never a plain-text 500: say what failed, as JSON
            log.exception("%s %s failed: %s", request.method, request.path, exc)
            return json_response(
                500, {"error": f"internal error: {type(exc).__name__}; nothing was accepted, retry"}
            )

    @staticmethod
    def _check_headers(request: web.Request) -> web.Response | None:
        """Header bytes that are not UTF-8 are the client's fault: 400 naming the header."""
        headers = request.headers
        for name in READ_HEADERS:
            value = headers.get(name)
            if value is None:
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return json_response(
                    400, {"error": f"header {name} is not valid UTF-8", "field": name}
                )
        return None

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self.tokens and request.path.startswith("/v1/") and not self._authorized(request):
            return json_response(
                401,
                {"error": "missing or wrong bearer token"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # Compare against every token so timing reveals nothing about which matched.
        ok = False
        for known in self.tokens:
            ok |= hmac.compare_digest(given, known.encode())
        return ok

    async def post_order(self, request: web.Request) -> web.Response:
        if not self._intake.accepting:
            return json_response(503, {"error": "agent is shutting down; retry"})
        if request.content_type != "application/json":
            return json_response(
                415,
                {"error": f"Content-Type must be application/json, got {request.content_type!r}"},
            )
        try:
            raw = await read_body(request, self._max_body, self._body_timeout_s)
        except BodyTooLarge as exc:
            return json_response(413, {"error": str(exc)}, headers={"Connection": "close"})
        except BodyTimeout as exc:
            return json_response(408, {"error": str(exc)}, headers={"Connection": "close"})
        reply = await self._intake.submit(raw, request.headers.get("Idempotency-Key"))
        return json_response(reply.status, reply.body, reply.headers)

    async def get_by_serial(self, request: web.Request) -> web.Response:
        serial = request.match_info["serial"]
        return await self._found(self._intake.find_serial(serial), "serial", serial)

    async def get_by_key(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        return await self._found(self._intake.find(key), "dedupe key", key)

    async def _found(self, finding: Awaitable[Entry | None], kind: str, value: str) -> web.Response:
        try:
            entry = await finding
        except UpstreamError as exc:
            return json_response(
                503,
                {
                    "error": f"the order with {kind} {value!r} was sent to a cluster just before a "
                    f"restart, and that cluster cannot confirm it now ({exc}); retry"
                },
            )
        if entry is None or not entry.acknowledged:
            return json_response(404, {"error": f"no order with this {kind}"})
        return json_response(200, await self._with_sms(entry.public()))

    async def _with_sms(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Add the order's SMS notice (state, masked phone), null when it has none, and,
        with chain verification on, its steps (``chain``: step -> state, null for an
        order that is no outage order)."""
        notice = None
        serial = str(answer["serial"])
        replicated = self._intake.replicated(serial)
        if replicated is not None and answer.get("state") == "buffered":
            answer = {**answer, "replicated": replicated}
        if self._sms_lookup is not None:
            notice = await self._sms_lookup(serial)
        if self._chain_lookup is None:
            return {**answer, "sms": notice}
        return {**answer, "sms": notice, "chain": await self._chain_lookup(serial)}

    async def chain_problems(self, request: web.Request) -> web.Response:
        """The outage orders whose chain step failed or is overdue, with what was wrong:
        the list customer service and finance work through (behind the token: it names
        orders)."""
        if self._chain_problems is None:
            return json_response(
                404, {"error": "chain verification is off: set [chain] enabled = true"}
            )
        rows = await self._chain_problems(CHAIN_PROBLEMS_LIMIT + 1)
        return json_response(
            200,
            {"problems": rows[:CHAIN_PROBLEMS_LIMIT], "more": len(rows) > CHAIN_PROBLEMS_LIMIT},
        )

    async def console_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=console.page(request.headers.get("Accept-Language", "")),
            content_type="text/html",
            charset="utf-8",
            headers=console.HEADERS,
        )

    async def console_asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = console.content_type(name)
        if kind is None:
            return json_response(404, {"error": "no such console file"})
        return web.Response(
            body=console.asset(name), content_type=kind, charset="utf-8", headers=console.HEADERS
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self._ready()
        return json_response(200 if ready else 503, {"ready": ready})

    async def status(self, request: web.Request) -> web.Response:
        return json_response(200, await self._status())

    async def metrics(self, request: web.Request) -> web.Response:
        await self._refresh_metrics()
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})
