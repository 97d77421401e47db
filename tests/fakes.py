"""Real servers on loopback that stand in for our neighbours: an order center."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    key: str
    body: bytes
    headers: dict[str, str]


@dataclass
class FakeCenter:
    """An order center (CONTRACT section 7) that honors Idempotency-Key.

    ``mode``: "up"; "503" (health and orders answer 503); "down" (the listener is
    closed: connections are refused). ``script``: statuses to answer the next
    POSTs with, before normal handling. ``creates`` counts real creates per key.
    """

    host: str = "127.0.0.2"
    port: int = 0
    mode: str = "up"
    delay_s: float = 0.0
    script: deque[int] = field(default_factory=deque)
    retry_after: str | None = None
    orders: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    creates: Counter[str] = field(default_factory=Counter)
    received: list[Received] = field(default_factory=list)
    health_checks: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v3"

    async def start(self) -> FakeCenter:
        if not self.port:
            self.port = free_port(self.host)
        app = web.Application()
        app.router.add_get("/v3/health", self._health)
        app.router.add_post("/v3/orders", self._post)
        app.router.add_get("/v3/orders/by-key/{key:.+}", self._by_key)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self.mode = "up" if self.mode == "down" else self.mode
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self) -> None:
        """Refuse connections from now on."""
        await self.stop()
        self.mode = "down"

    async def come_up(self) -> None:
        self.mode = "up"
        if self._runner is None:
            await self.start()

    def created_keys(self) -> set[str]:
        return set(self.creates)

    def duplicates(self) -> dict[str, int]:
        return {k: n for k, n in self.creates.items() if n > 1}

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if self.mode != "up":
            return web.json_response({"ok": False}, status=503)
        return web.json_response({"ok": True})

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.received.append(Received(key, body, dict(request.headers)))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode != "up":
            return web.json_response({"error": "unavailable"}, status=503)
        if self.script:
            status = self.script.popleft()
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": f"scripted {status}"}, status=status,
                                     headers=headers)
        if key in self.orders:
            order_id, first = self.orders[key]
            if first != body:
                return web.json_response({"error": "key reused with another body"}, status=422)
            return web.json_response({"order_id": order_id, "duplicate": True}, status=200)
        order_id = f"OC{next(self._ids):08d}"
        self.orders[key] = (order_id, body)
        self.creates[key] += 1
        return web.json_response({"order_id": order_id}, status=201)

    async def _by_key(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self.orders:
            return web.json_response({"error": "not found"}, status=404)
        order_id, body = self.orders[key]
        return web.Response(body=orjson.dumps({"order_id": order_id, "body": body.decode()}),
                            content_type="application/json")


# -- SMS gateways (CONTRACT section 9) ------------------------------------------------


@dataclass
class SmsReceived:
    serial: str
    phone: str
    doc: dict[str, Any]
    headers: dict[str, str]
    at: float


class _Listener:
    """start / stop / go_down / come_up for a small aiohttp app on a fixed loopback port."""

    host: str
    port: int
    _runner: web.AppRunner | None

    def _app(self) -> web.Application:  # pragma: no cover - overridden
        raise NotImplementedError

    async def start(self) -> Any:
        if not self.port:
            self.port = free_port(self.host)
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self) -> None:
        """Refuse connections from now on."""
        await self.stop()

    async def come_up(self) -> None:
        if self._runner is None:
            await self.start()


@dataclass
class FakeSmsGateway(_Listener):
    """The ``http`` provider's gateway: JSON {"phone","sign_name","template","params","text"}.

    ``token``: the bearer token it demands (401 otherwise). ``script``: statuses for
    the next requests. ``delay_s``: answer late (to provoke client timeouts).
    """

    host: str = "127.0.0.4"
    port: int = 0
    token: str = ""
    delay_s: float = 0.0
    script: deque[int] = field(default_factory=deque)
    received: list[SmsReceived] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/send"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/send", self._send)
        return app

    def per_serial(self) -> Counter[str]:
        return Counter(r.serial for r in self.received)

    async def _send(self, request: web.Request) -> web.Response:
        import time

        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "bad token"}, status=401)
        doc = orjson.loads(await request.read())
        if self.script:
            status = self.script.popleft()
            return web.json_response({"error": f"scripted {status}"}, status=status)
        # Counted when accepted: what a customer's phone would show.
        self.received.append(SmsReceived(doc["params"]["SN"], doc["phone"], doc,
                                         dict(request.headers), time.monotonic()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response({"id": f"M{len(self.received)}"})


def aliyun_percent(value: str) -> str:
    """RFC 3986 as Alibaba Cloud documents it: unreserved characters stay, space is %20."""
    from urllib.parse import quote

    return quote(value, safe="-_.~")


def aliyun_expected_signature(secret: str, method: str, raw_query: str,
                              headers: dict[str, str], signed_names: list[str],
                              body: bytes) -> str:
    """Recompute an ACS3-HMAC-SHA256 signature from a received request, as the service does."""
    import hashlib
    import hmac
    from urllib.parse import parse_qsl

    pairs = parse_qsl(raw_query, keep_blank_values=True)
    query = "&".join(f"{aliyun_percent(k)}={aliyun_percent(v)}" for k, v in sorted(pairs))
    lowered = {k.lower(): v.strip() for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered.get(name, '')}\n" for name in signed_names)
    canonical = (f"{method}\n/\n{query}\n{canonical_headers}\n{';'.join(signed_names)}\n"
                 f"{hashlib.sha256(body).hexdigest()}")
    to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
    return hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


@dataclass
class FakeAliyun(_Listener):
    """Dysms ``SendSms`` (2017-05-25) that checks the V3 signature like the real service.

    Rejects (HTTP 400 SignatureDoesNotMatch / InvalidAccessKeyId / ...) what the
    real one would; ``codes``: answer codes for the next valid requests (e.g.
    ``isv.BUSINESS_LIMIT_CONTROL``), before "OK".
    """

    access_key_id: str = "LTAI-test-key"
    access_key_secret: str = "test-secret-never-logged"
    host: str = "127.0.0.4"
    port: int = 0
    codes: deque[str] = field(default_factory=deque)
    received: list[SmsReceived] = field(default_factory=list)
    attempts: list[tuple[float, str]] = field(default_factory=list)  # (when, answer code)
    rejected: list[str] = field(default_factory=list)
    nonces: set[str] = field(default_factory=set)
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/", self._rpc)
        return app

    def per_serial(self) -> Counter[str]:
        return Counter(r.serial for r in self.received)

    def _refuse(self, code: str, status: int = 400) -> web.Response:
        self.rejected.append(code)
        return web.json_response({"Code": code, "Message": code, "RequestId": "R-refused"},
                                 status=status)

    async def _rpc(self, request: web.Request) -> web.Response:
        import hashlib
        import hmac
        import re
        import time
        from datetime import UTC, datetime

        body = await request.read()
        auth = request.headers.get("Authorization", "")
        m = re.fullmatch(r"ACS3-HMAC-SHA256 Credential=([^,]+),SignedHeaders=([^,]+),"
                         r"Signature=([0-9a-f]{64})", auth)
        if m is None:
            return self._refuse("MissingAuthorization")
        key_id, signed, signature = m.groups()
        if key_id != self.access_key_id:
            return self._refuse("InvalidAccessKeyId.NotFound", 404)
        names = signed.split(";")
        required = {"host", "x-acs-action", "x-acs-version", "x-acs-date",
                    "x-acs-signature-nonce", "x-acs-content-sha256"}
        if names != sorted(names) or not required <= set(names):
            return self._refuse("IncompleteSignature")
        if request.headers.get("x-acs-content-sha256") != hashlib.sha256(body).hexdigest():
            return self._refuse("ContentSha256Mismatch")
        expected = aliyun_expected_signature(self.access_key_secret, request.method,
                                             request.query_string, dict(request.headers),
                                             names, body)
        if not hmac.compare_digest(expected, signature):
            return self._refuse("SignatureDoesNotMatch")
        sent_at = datetime.strptime(request.headers["x-acs-date"], "%Y-%m-%dT%H:%M:%SZ")
        if abs(sent_at.replace(tzinfo=UTC).timestamp() - time.time()) > 900:
            return self._refuse("InvalidTimeStamp.Expired")
        nonce = request.headers["x-acs-signature-nonce"]
        if nonce in self.nonces:
            return self._refuse("SignatureNonceUsed")
        self.nonces.add(nonce)
        if (request.headers.get("x-acs-action"), request.headers.get("x-acs-version")) != (
                "SendSms", "2017-05-25"):
            return self._refuse("InvalidAction.NotFound", 404)
        q = request.query
        for name in ("PhoneNumbers", "SignName", "TemplateCode"):
            if not q.get(name):
                return self._refuse(f"MissingParameter.{name}")
        code = self.codes.popleft() if self.codes else "OK"
        self.attempts.append((time.monotonic(), code))
        if code != "OK":
            return web.json_response({"Code": code, "Message": "scripted", "RequestId": "R-x"})
        params = orjson.loads(q.get("TemplateParam", "{}"))
        if not isinstance(params, dict) or params.get("SN") != q.get("OutId"):
            return self._refuse("isv.TEMPLATE_PARAMS_ILLEGAL")
        self.received.append(SmsReceived(q.get("OutId", ""), q["PhoneNumbers"], dict(q),
                                         dict(request.headers), time.monotonic()))
        return web.json_response({"Code": "OK", "Message": "OK",
                                  "BizId": f"{len(self.received)}^0", "RequestId": "R-ok"})
