"""The agent's HTTP API (CONTRACT section 4): thin handlers over the intake and journal."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from agent.intake.orders import Intake
from agent.service.metrics import CONTENT_TYPE, Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StatusSource = Callable[[], Awaitable[dict[str, Any]]]
ReadySource = Callable[[], bool]


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body),
                        content_type="application/json", headers=headers)


class HttpApi:
    def __init__(self, intake: Intake, metrics: Metrics,
                 tokens: frozenset[str], max_body_bytes: int,
                 status: StatusSource, ready: ReadySource) -> None:
        self._intake = intake
        self._metrics = metrics
        self.tokens = tokens
        self._max_body = max_body_bytes
        self._status = status
        self._ready = ready

    def build_app(self) -> web.Application:
        # Bodies are read by hand below, so aiohttp's own limit only guards the rest.
        app = web.Application(middlewares=[self._errors, self._auth],
                              client_max_size=self._max_body + 1)
        app.router.add_post("/v1/orders", self.post_order)
        app.router.add_get("/v1/orders/by-key/{key:.+}", self.get_by_key)
        app.router.add_get("/v1/orders/{serial}", self.get_by_serial)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error answer is JSON, including aiohttp's own 404/405."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_response(exc.status, {"error": exc.reason})

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.tokens and request.path.startswith("/v1/") and not self._authorized(request):
            return json_response(401, {"error": "missing or wrong bearer token"},
                                 headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

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
            return json_response(415, {"error": "Content-Type must be application/json, got "
                                                f"{request.content_type!r}"})
        too_large = {"error": f"body is larger than agent.max_body_bytes ({self._max_body})"}
        if request.content_length is not None and request.content_length > self._max_body:
            return json_response(413, too_large)
        raw = await request.content.read(self._max_body + 1)
        if len(raw) > self._max_body:
            return json_response(413, too_large)
        reply = await self._intake.submit(raw, request.headers.get("Idempotency-Key"))
        return json_response(reply.status, reply.body, reply.headers)

    async def get_by_serial(self, request: web.Request) -> web.Response:
        entry = await self._intake.lookup_serial(request.match_info["serial"])
        if entry is None or not entry.acknowledged:
            return json_response(404, {"error": "no order with this serial"})
        return json_response(200, entry.public())

    async def get_by_key(self, request: web.Request) -> web.Response:
        entry = await self._intake.lookup(request.match_info["key"])
        if entry is None or not entry.acknowledged:
            return json_response(404, {"error": "no order with this dedupe key"})
        return json_response(200, entry.public())

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self._ready()
        return json_response(200 if ready else 503, {"ready": ready})

    async def status(self, request: web.Request) -> web.Response:
        return json_response(200, await self._status())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE})
