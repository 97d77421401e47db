"""``equal`` in a chain step: exact decimals when both sides are numbers, else strings.

``"199.10"`` equals ``199.1`` (the same amount written two ways); ``199`` does
not equal ``"199.10"`` (the truncated-amount fault that makes finance disagree
with the order center). Both sides come from ``load_json`` (floats as
Decimal), so nothing was rounded on the way in.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.base.template import as_text

# A plain decimal number as text: no NaN, no Infinity, no thousands separators.
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def as_decimal(value: Any) -> Decimal | None:
    """The exact number ``value`` is or spells, or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        try:
            return Decimal(value.strip())
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            return None
    return None


def same_value(got: Any, expected: Any) -> bool:
    """Exact decimal equality when both are numbers or numeric strings, else as text."""
    a, b = as_decimal(got), as_decimal(expected)
    if a is not None and b is not None:
        return a == b
    return as_text(got) == as_text(expected)


def shown(value: Any) -> str:
    """A value for a report: JSON-like, so "199" and 199 stay apart."""
    if isinstance(value, str):
        return '"' + value + '"'
    return as_text(value)
