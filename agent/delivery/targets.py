"""Naming the target an order is pinned to (CONTRACT 5 ``pinned_to``).

A pin names the one place that may already hold an order: a configured cluster
("primary", "standby"), or, when ``edge-recover --target URL`` sent it to a URL
that is no configured cluster, that URL itself. The pinned order then goes only
there: the agent's drain never sends it (it knows no such cluster) and
edge-recover sends it only to a ``--target`` that names the same place. URLs are
compared normalised (scheme and host case, default port, trailing slash), never
resolved: an IP address and a host name are different targets, because whether
they reach the same idempotency store is not something DNS can prove.
"""

from __future__ import annotations

from urllib.parse import urlsplit

CLUSTERS = ("primary", "standby")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str) -> str | None:
    """``scheme://host[:port]/path`` in one spelling, or None if ``url`` is no http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower().rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


def valid_pin(value: object) -> bool:
    """What a record's ``pinned_to`` may hold: null, a cluster name, or an http(s) URL."""
    return (
        value is None
        or value in CLUSTERS
        or (isinstance(value, str) and normalize_url(value) is not None)
    )


def same_target(pinned_to: str, name: str | None, url: str | None) -> bool:
    """Does a pin name the target known as ``name`` (a cluster, or None) at ``url``?"""
    if name is not None and pinned_to == name:
        return True
    if url is None or pinned_to in CLUSTERS:
        return False
    mine = normalize_url(url)
    return mine is not None and normalize_url(pinned_to) == mine


def may_send(pinned_to: str | None, name: str | None, url: str | None) -> bool:
    """May an order pinned to ``pinned_to`` go to the target ``name`` at ``url``?"""
    return pinned_to is None or same_target(pinned_to, name, url)


def cluster_of(url: str, clusters: dict[str, str]) -> str | None:
    """The configured cluster (name -> base URL) that ``url`` names, if any."""
    wanted = normalize_url(url)
    if wanted is None:
        return None
    return next((name for name, base in clusters.items() if normalize_url(base) == wanted), None)
