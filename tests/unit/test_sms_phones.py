"""Phone validation, normalization and masking, and the masking of every log line."""

from __future__ import annotations

import logging
import re
import sys

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.base.phones import check, mask, mask_phones
from agent.logs import JsonFormatter


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        ("13812345678", "13812345678"),
        ("+8613812345678", "13812345678"),
        ("008613812345678", "13812345678"),
        ("138 1234-5678", "13812345678"),
        ("19912345678", "19912345678"),
        ("+447911123456", "+447911123456"),
        ("+1 (415) 555-2671", "+14155552671"),
        ("12812345678", None),  # 1[3-9] only
        ("1381234567", None),  # 10 digits
        ("138123456789", None),  # 12 digits
        ("+862155551234", None),  # a +86 landline cannot take an SMS
        ("+0123456789", None),  # E.164 never starts with 0
        ("+1234567890123456", None),  # more than 15 digits
        ("", None),
        ("call me", None),
    ],
)
def test_check(raw: str, number: str | None):
    got = check(raw)
    assert got.number == number
    assert bool(got.reason) == (number is None)


def test_mask():
    assert mask("13812345678") == "138****5678"
    assert mask("+8613812345678") == "138****5678"
    assert mask("+447911123456") == "+447****3456"
    assert mask("123") == "****"


def test_mask_phones_in_text_leaves_serials_and_numbers_alone():
    text = (
        "to 13812345678, +8613912345678 and +447911123456; serial "
        "WH-SH-01-20261125-000000123, 2147483648 bytes, t=1718000000.123"
    )
    assert mask_phones(text) == (
        "to 138****5678, 139****5678 and +447****3456; serial "
        "WH-SH-01-20261125-000000123, 2147483648 bytes, t=1718000000.123"
    )


def test_every_log_line_is_masked_whatever_logged_it():
    try:
        raise ValueError("bad phone 13812345678")
    except ValueError:
        record = logging.LogRecord(
            "some.library",
            logging.ERROR,
            __file__,
            1,
            "sending to %s",
            ("13912345678",),
            sys.exc_info(),
        )
    record.customer = {"phone": "+8613712345678"}
    line = JsonFormatter().format(record)
    doc = orjson.loads(line)
    assert doc["msg"] == "sending to 139****5678"
    assert "138****5678" in doc["exc"]
    for full in ("13812345678", "13912345678", "13712345678"):
        assert full not in line


def _two_scans(text: str) -> str:
    """mask_phones as it was (mainland mobiles, then ``+`` numbers, in two scans): the
    one-scan version must mask exactly the same way."""
    mainland = re.compile(r"(?<![\d*])(?:\+?86|0086)?1[3-9]\d{9}(?![\d*])")
    anything = re.compile(r"(?<![\d*])(?:\+86|0086|\+)?\d{7,15}(?![\d*])")
    text = mainland.sub(lambda m: mask(m.group(0)), text)
    return anything.sub(lambda m: mask(m[0]) if m[0].startswith("+") else m[0], text)


_PHONEISH = st.sampled_from(
    [
        "13812345678",
        "+8613812345678",
        "8615012345678",
        "008613912345678",
        "+0086138123456789",
        "+008613812345678",
    ]
)


@given(
    st.lists(
        st.text(alphabet="0123456789+* x-", max_size=12) | _PHONEISH | st.integers().map(str),
        max_size=8,
    ).map("".join)
)
def test_mask_phones_masks_like_two_scans(text: str):
    assert mask_phones(text) == _two_scans(text)
