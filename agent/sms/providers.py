"""SMS providers behind one small interface: ``http``, ``aliyun`` and ``log``.

A provider sends one notice or raises one of our ``SmsError`` classes. This
module is the one place where aiohttp errors and provider answers become
ours (``_translate`` and the two ``_classify_*`` functions). The outbox
decides what to do with each class; nothing here retries.

Secrets come from ``$CREDENTIALS_DIRECTORY/sms`` (systemd ``LoadCredential=``)
or ``sms.credentials_file``; they are never logged and never in a repr.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from agent.base.phones import mask
from agent.config import SmsSection
from agent.errors import (
    ConfigError,
    SmsAmbiguous,
    SmsError,
    SmsRateLimited,
    SmsRejected,
    SmsTransient,
)
from agent.sms.aliyun_sign import AccessKey, sign_request
from agent.upstream.http_errors import LIBRARY_ERRORS, Phase, failure_phase

log = logging.getLogger("agent.sms")

ALIYUN_ACTION, ALIYUN_VERSION = "SendSms", "2017-05-25"
# Aliyun answers with HTTP 200 and one of these codes when it throttles us.
_ALIYUN_RATE_CODES = frozenset(
    {
        "isv.BUSINESS_LIMIT_CONTROL",
        "isv.DAY_LIMIT_CONTROL",
        "Throttling",
        "Throttling.User",
        "Throttling.Api",
    }
)
_ALIYUN_TRANSIENT_CODES = frozenset(
    {"isp.SYSTEM_ERROR", "isp.GATEWAY_ERROR", "ServiceUnavailable", "InternalError"}
)


@dataclass(frozen=True)
class Notice:
    """One rendered SMS for one serial."""

    serial: str
    phone: str  # normalized (see phones.check)
    sign_name: str
    template: str
    text: str

    def __repr__(self) -> str:
        return f"Notice(serial={self.serial!r}, phone={mask(self.phone)!r})"


class SmsProvider(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, notice: Notice) -> str:
        """Send ``notice``; return the provider's message id ("" if none)."""
        ...


@dataclass(frozen=True)
class Credentials:
    token: str = field(default="", repr=False)
    access_key_id: str = ""
    access_key_secret: str = field(default="", repr=False)


def load_credentials(s: SmsSection) -> Credentials:
    """One bare line (a bearer token) or ``name = value`` lines: token, access_key_id,
    access_key_secret. Raises ConfigError when a needed secret cannot be read."""
    if s.provider == "log":
        return Credentials()
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    path: Path | None = None
    if cred_dir and (Path(cred_dir) / "sms").exists():
        path = Path(cred_dir) / "sms"
    elif s.credentials_file:
        path = Path(s.credentials_file)
    if path is None:
        if s.provider == "aliyun":
            raise ConfigError(
                "sms.credentials_file is required for provider aliyun "
                "(or $CREDENTIALS_DIRECTORY/sms)"
            )
        return Credentials()  # an http gateway without auth
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read SMS credentials file {path}: {exc.strerror}; check sms.credentials_file"
        ) from exc
    values: dict[str, str] = {}
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip().lower()] = value.strip().strip('"')
        else:
            values.setdefault("token", line)
    creds = Credentials(
        values.get("token", ""),
        values.get("access_key_id", ""),
        values.get("access_key_secret", ""),
    )
    if s.provider == "aliyun" and not (creds.access_key_id and creds.access_key_secret):
        raise ConfigError(
            f"SMS credentials file {path} must set access_key_id and "
            "access_key_secret for provider aliyun"
        )
    return creds


def build_provider(s: SmsSection) -> SmsProvider:
    creds = load_credentials(s)
    if s.provider == "http":
        return HttpProvider(s, creds.token)
    if s.provider == "aliyun":
        return AliyunProvider(s, AccessKey(creds.access_key_id, creds.access_key_secret))
    return LogProvider()


class LogProvider:
    """Writes the rendered text to the log: drills without a gateway."""

    name = "log"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, notice: Notice) -> str:
        log.info(
            "SMS (log provider) to %s: %s",
            mask(notice.phone),
            notice.text,
            extra={"serial": notice.serial, "phone": mask(notice.phone)},
        )
        return ""


class _SessionOwner:
    name = "?"

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2.0))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No keep-alive: a POST on a stale pooled connection fails in a way that looks
        # like "sent, no answer", which the at-most-once rule could never resend.
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, connector=aiohttp.TCPConnector(force_close=True)
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(
        self, url: str | URL, headers: dict[str, str], data: bytes
    ) -> tuple[int, bytes]:
        if self._session is None:
            raise RuntimeError(f"{self.name} provider: start() must be awaited before send()")
        try:
            async with self._session.post(url, headers=headers, data=data) as resp:
                return resp.status, await resp.read()
        except _LIBRARY_ERRORS as exc:
            raise _translate(exc, self.name) from exc


class HttpProvider(_SessionOwner):
    """CONTRACT section 9: POST {"phone","sign_name","template","params":{"SN"},"text"}."""

    name = "http"

    def __init__(self, s: SmsSection, token: str) -> None:
        super().__init__(s.timeout_s)
        self._url = s.url
        self._token = token

    async def send(self, notice: Notice) -> str:
        body = orjson.dumps(
            {
                "phone": notice.phone,
                "sign_name": notice.sign_name,
                "template": notice.template,
                "params": {"SN": notice.serial},
                "text": notice.text,
            }
        )
        headers = {"Content-Type": "application/json", "Idempotency-Key": notice.serial}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        status, payload = await self._post(self._url, headers, body)
        return _classify_http(status, payload)


class AliyunProvider(_SessionOwner):
    """Dysms ``SendSms`` (2017-05-25), signed with ACS3-HMAC-SHA256; OutId = our serial."""

    name = "aliyun"

    def __init__(self, s: SmsSection, key: AccessKey) -> None:
        super().__init__(s.timeout_s)
        parts = urlsplit(s.endpoint)
        self._base = f"{parts.scheme}://{parts.netloc}/"
        self._host = parts.netloc
        self._key = key
        self._sign_name = s.sign_name
        self._template_code = s.template_code

    async def send(self, notice: Notice) -> str:
        params = {
            "PhoneNumbers": notice.phone,
            "SignName": notice.sign_name,
            "TemplateCode": self._template_code,
            "TemplateParam": orjson.dumps({"SN": notice.serial}).decode(),
            "OutId": notice.serial,
        }
        query, headers = sign_request(
            self._key, "POST", self._host, ALIYUN_ACTION, ALIYUN_VERSION, params
        )
        url = URL(f"{self._base}?{query}", encoded=True)
        status, payload = await self._post(url, headers, b"")
        return _classify_aliyun(status, payload)


def _doc(payload: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        return {"error": payload[:200].decode("utf-8", "replace")}
    return doc if isinstance(doc, dict) else {}


def _classify_http(status: int, payload: bytes) -> str:
    doc = _doc(payload)
    reason = str(doc.get("error") or doc.get("message") or "")[:300]
    if 200 <= status < 300:
        return str(doc.get("id") or doc.get("message_id") or "")
    if status == 429:
        raise SmsRateLimited(f"http gateway throttles us (HTTP 429) {reason}".strip())
    if status in (408, 425) or status >= 500:
        raise SmsTransient(f"http gateway answered HTTP {status} {reason}".strip())
    raise SmsRejected(f"http gateway refused the notice (HTTP {status}) {reason}".strip())


def _classify_aliyun(status: int, payload: bytes) -> str:
    doc = _doc(payload)
    code = str(doc.get("Code") or "")
    reason = f"{code}: {str(doc.get('Message') or '')[:200]}".strip(": ")
    if status == 200 and code == "OK":
        return str(doc.get("BizId") or "")
    if code in _ALIYUN_RATE_CODES or status == 429:
        raise SmsRateLimited(f"aliyun throttles us ({reason or f'HTTP {status}'})")
    if code in _ALIYUN_TRANSIENT_CODES or status >= 500:
        raise SmsTransient(f"aliyun answered HTTP {status} ({reason or 'no code'})")
    raise SmsRejected(f"aliyun refused the notice: HTTP {status} ({reason or 'no code'})")


_LIBRARY_ERRORS = LIBRARY_ERRORS


def _translate(exc: BaseException, provider: str) -> SmsError:
    """Before the request left us: transient. After: ambiguous, never resent."""
    phase = failure_phase(exc)
    if phase in (Phase.DNS, Phase.CONNECT):
        return SmsTransient(f"{provider}: cannot connect: {exc}")
    if phase is Phase.INVALID_URL:
        return SmsRejected(f"{provider}: invalid URL: {exc}")
    if phase is Phase.TIMEOUT:
        return SmsAmbiguous(f"{provider}: no answer in time; the notice may have gone out")
    return SmsAmbiguous(f"{provider}: connection failed after sending: {exc!r}")
