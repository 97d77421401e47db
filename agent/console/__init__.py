"""The ops and customer-service console: static files served by the agent at ``/``.

Plain HTML, CSS and JavaScript, no build step and no library; shipped as package data
(pyproject ``[tool.setuptools.package-data]``) and read once through importlib.resources.
"""

from __future__ import annotations

import functools
from importlib import resources

ASSETS = {
    "index.html": "text/html",
    "console.css": "text/css",
    "console.js": "application/javascript",
    "strings.json": "application/json",
}
# The page is static and the same for everyone; data comes from /status and /v1/orders.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


def content_type(name: str) -> str | None:
    return ASSETS.get(name)


@functools.cache
def asset(name: str) -> bytes:
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath(name).read_bytes()


def pick_lang(accept_language: str) -> str:
    """``zh`` if the browser prefers Chinese over English (Accept-Language), else ``en``."""
    best, best_q = "en", -1.0
    for part in accept_language.split(","):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        lang = "zh" if tag.startswith("zh") else "en" if tag.startswith("en") else None
        if lang is not None and q > best_q:
            best, best_q = lang, q
    return best


def page(accept_language: str) -> bytes:
    """index.html with the language the browser asked for (the page can switch it)."""
    lang = pick_lang(accept_language)
    return asset("index.html").replace(b'data-lang="en"', f'data-lang="{lang}"'.encode(), 1)
