"""Request templates for downstream checks, and JSON pointers (RFC 6901).

A template is text with placeholders: ``{order_id}``, ``{serial}``,
``{dedupe_key}``, ``{channel_id}``, ``{channel_order_id}``, ``{received_at}``
and ``{order:/json/pointer}`` (any field of the raw order body). Anything else
in braces that looks like a placeholder is an error when the template is
compiled (at config load), so a typo never reaches a downstream system. Other
braces are literal text: ``{"order_no": "{order_id}"}`` is a body template.

Values are escaped for where they go: URL-encoded (``quote(safe="")``) in a
URL, JSON-escaped in a body (the template puts the quotes). Documents are read
with ``parse_float=Decimal`` (see ``load_json``) so an amount renders exactly
as the order carried it: ``199.10`` stays ``199.10``.

The JSON pointer is a few lines by hand rather than the ``jsonpointer``
package: resolving ``/a/0/b~1c`` needs no dependency, and the error we need
("absent") is one exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

# Facts of the order record a template may name (the ledger keeps each of them).
FIELDS = ("order_id", "serial", "dedupe_key", "channel_id", "channel_order_id", "received_at")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[^{}]*)?\}")
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")


class TemplateError(ValueError):
    """A template or pointer that can never be filled; the message says why."""


class Absent(LookupError):
    """A JSON pointer names nothing in this document (or a value is missing)."""


def load_json(data: bytes | str) -> Any:
    """JSON with exact numbers: floats as Decimal, so nothing is rounded."""
    return json.loads(data, parse_float=Decimal)


def parse_pointer(text: str) -> tuple[str, ...]:
    """RFC 6901: ``""`` is the whole document; else ``/``-separated, ``~1`` = ``/``,
    ``~0`` = ``~``."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise TemplateError(f"JSON pointer {text!r} must start with '/' (e.g. /items/0/id)")
    tokens = text[1:].split("/")
    for token in tokens:
        if re.search(r"~[^01]|~$", token):
            raise TemplateError(f"JSON pointer {text!r} has a '~' not followed by 0 or 1")
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in tokens)


def resolve(doc: Any, tokens: tuple[str, ...]) -> Any:
    """The value ``tokens`` names in ``doc``; Absent when there is none."""
    for token in tokens:
        if isinstance(doc, dict):
            if token not in doc:
                raise Absent(token)
            doc = doc[token]
        elif isinstance(doc, list):
            if not _INDEX.match(token) or int(token) >= len(doc):
                raise Absent(token)
            doc = doc[int(token)]
        else:
            raise Absent(token)
    return doc


def as_text(value: Any) -> str:
    """A JSON value as a template fills it in: strings as they are, numbers exactly
    (a Decimal keeps its digits), everything else as its JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | Decimal):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


@dataclass(frozen=True)
class Values:
    """What a template can be filled from: the order record and its raw body."""

    fields: Mapping[str, str | None]
    body: Any = None  # the parsed order body (load_json), None when unknown

    def get(self, name: str, pointer: tuple[str, ...] | None) -> str:
        if pointer is None:
            value = self.fields.get(name)
            if value is None:
                raise Absent(f"{{{name}}} is not known for this order")
            return value
        if self.body is None:
            raise Absent("the order body is not known")
        try:
            found = resolve(self.body, pointer)
        except Absent as exc:
            raise Absent(f"the order has no {pointer_text(pointer)}") from exc
        if found is None:
            raise Absent(f"the order's {pointer_text(pointer)} is null")
        return as_text(found)


@dataclass(frozen=True)
class _Slot:
    name: str  # a FIELDS name, or "order" with a pointer
    pointer: tuple[str, ...] | None


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[str | _Slot, ...]

    @classmethod
    def compile(cls, text: str) -> Template:
        parts: list[str | _Slot] = []
        at = 0
        for m in _PLACEHOLDER.finditer(text):
            name, rest = m.group(1), m.group(2)
            if name == "order" and rest is not None:
                slot = _Slot("order", parse_pointer(rest[1:]))
            elif name in FIELDS and rest is None:
                slot = _Slot(name, None)
            else:
                raise TemplateError(
                    f"unknown placeholder {m.group(0)}; use one of "
                    + ", ".join(f"{{{f}}}" for f in FIELDS)
                    + " or {order:/json/pointer}"
                )
            parts += [text[at : m.start()], slot]
            at = m.end()
        parts.append(text[at:])
        return cls(text, tuple(p for p in parts if p != ""))

    def render(self, values: Values, escape: Callable[[str], str]) -> str:
        """Fill every placeholder, each value passed through ``escape``; Absent if one
        has no value for this order."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(escape(values.get(part.name, part.pointer)))
        return "".join(out)

    def url(self, values: Values) -> str:
        return self.render(values, url_escape)

    def json_body(self, values: Values) -> str:
        return self.render(values, json_escape)

    def sample(self) -> str:
        """Filled with a harmless value, to check at load that the result is a URL."""
        return self.render(_SAMPLE, url_escape)


def url_escape(value: str) -> str:
    return quote(value, safe="")


def json_escape(value: str) -> str:
    """The inside of a JSON string (the template writes the quotes around it)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def pointer_text(tokens: tuple[str, ...]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens) or "(root)"


class _SampleValues(Values):
    def get(self, name: str, pointer: tuple[str, ...] | None) -> str:
        return "x"


_SAMPLE = _SampleValues({})
