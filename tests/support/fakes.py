"""Real servers on loopback that stand in for our neighbours.

The order center and the SMS gateway are the sandbox's own (agent/sandbox/servers.py),
so the drills and the tests check the promise against the same fakes. The Aliyun
endpoint, which recomputes request signatures, lives here.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from agent.sandbox.servers import Listener, SmsReceived, free_port
from agent.sandbox.servers import SandboxCenter as FakeCenter
from agent.sandbox.servers import SandboxSmsGateway as FakeSmsGateway

__all__ = ["FakeAliyun", "FakeCenter", "FakeSmsGateway", "free_port"]


def aliyun_percent(value: str) -> str:
    """RFC 3986 as Alibaba Cloud documents it: unreserved characters stay, space is %20."""
    from urllib.parse import quote

    return quote(value, safe="-_.~")


def aliyun_expected_signature(
    secret: str,
    method: str,
    raw_query: str,
    headers: dict[str, str],
    signed_names: list[str],
    body: bytes,
) -> str:
    """Recompute an ACS3-HMAC-SHA256 signature from a received request, as the service does."""
    import hashlib
    import hmac
    from urllib.parse import parse_qsl

    pairs = parse_qsl(raw_query, keep_blank_values=True)
    query = "&".join(f"{aliyun_percent(k)}={aliyun_percent(v)}" for k, v in sorted(pairs))
    lowered = {k.lower(): v.strip() for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered.get(name, '')}\n" for name in signed_names)
    canonical = (
        f"{method}\n/\n{query}\n{canonical_headers}\n{';'.join(signed_names)}\n"
        f"{hashlib.sha256(body).hexdigest()}"
    )
    to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
    return hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


@dataclass
class FakeAliyun(Listener):
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
        return web.json_response(
            {"Code": code, "Message": code, "RequestId": "R-refused"}, status=status
        )

    async def _rpc(self, request: web.Request) -> web.Response:
        import hashlib
        import hmac
        import re
        import time
        from datetime import UTC, datetime

        body = await request.read()
        auth = request.headers.get("Authorization", "")
        m = re.fullmatch(
            r"ACS3-HMAC-SHA256 Credential=([^,]+),SignedHeaders=([^,]+),"
            r"Signature=([0-9a-f]{64})",
            auth,
        )
        if m is None:
            return self._refuse("MissingAuthorization")
        key_id, signed, signature = m.groups()
        if key_id != self.access_key_id:
            return self._refuse("InvalidAccessKeyId.NotFound", 404)
        names = signed.split(";")
        required = {
            "host",
            "x-acs-action",
            "x-acs-version",
            "x-acs-date",
            "x-acs-signature-nonce",
            "x-acs-content-sha256",
        }
        if names != sorted(names) or not required <= set(names):
            return self._refuse("IncompleteSignature")
        if request.headers.get("x-acs-content-sha256") != hashlib.sha256(body).hexdigest():
            return self._refuse("ContentSha256Mismatch")
        expected = aliyun_expected_signature(
            self.access_key_secret,
            request.method,
            request.query_string,
            dict(request.headers),
            names,
            body,
        )
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
            "SendSms",
            "2017-05-25",
        ):
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
        self.received.append(
            SmsReceived(
                q.get("OutId", ""),
                q["PhoneNumbers"],
                dict(q),
                dict(request.headers),
                time.monotonic(),
            )
        )
        return web.json_response(
            {"Code": "OK", "Message": "OK", "BizId": f"{len(self.received)}^0", "RequestId": "R-ok"}
        )
