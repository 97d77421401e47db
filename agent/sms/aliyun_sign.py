"""Alibaba Cloud's V3 request signature, ACS3-HMAC-SHA256 (the RPC "V2" one is retired).

    CanonicalRequest = METHOD \\n CanonicalURI \\n CanonicalQueryString \\n
                       CanonicalHeaders \\n SignedHeaders \\n HashedRequestPayload
    StringToSign     = "ACS3-HMAC-SHA256" \\n hex(sha256(CanonicalRequest))
    Authorization    = ACS3-HMAC-SHA256 Credential=<AccessKeyId>,
                       SignedHeaders=<h1;h2;...>,Signature=hex(hmac_sha256(secret, StringToSign))

Percent-encoding is RFC 3986 (only ``A-Za-z0-9-_.~`` stay as they are, so a
space is ``%20``); parameters are sorted by name; the signed headers are
``host``, ``content-type`` and every ``x-acs-*`` header, lower-cased and sorted,
each line ``name:trimmed value``. RPC-style APIs use ``/`` as the URI.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

ALGORITHM = "ACS3-HMAC-SHA256"


@dataclass(frozen=True)
class AccessKey:
    id: str
    secret: str = field(repr=False)


def encode(value: str) -> str:
    return quote(value, safe="-_.~")


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(params.items()))


def _signed(headers: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if low in ("host", "content-type") or low.startswith("x-acs-"):
            out[low] = value.strip()
    return dict(sorted(out.items()))


def sign_request(
    key: AccessKey,
    method: str,
    host: str,
    action: str,
    version: str,
    params: Mapping[str, str],
    body: bytes = b"",
    *,
    now: datetime | None = None,
    nonce: str | None = None,
) -> tuple[str, dict[str, str]]:
    """Return (the canonical query string to send, every header to send with it)."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": version,
        "x-acs-date": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": nonce or secrets.token_hex(16),
        "x-acs-content-sha256": payload_hash,
    }
    query = canonical_query(params)
    signed = _signed(headers)
    canonical = "\n".join(
        [
            method.upper(),
            "/",
            query,
            "".join(f"{k}:{v}\n" for k, v in signed.items()),
            ";".join(signed),
            payload_hash,
        ]
    )
    to_sign = f"{ALGORITHM}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(key.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"{ALGORITHM} Credential={key.id},SignedHeaders={';'.join(signed)},Signature={signature}"
    )
    return query, headers
