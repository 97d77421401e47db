"""Which order files the merge moves as they are, adding its keys in place (issue 23).

The answer is decided when the file is parsed in the claim thread, from the parsed
object's keys; a file that may not take the keys gets a new merged/ copy instead.
"""

from __future__ import annotations

import orjson

from recovery.source import read_record
from tests.support.recover_helpers import body, record

NODE = "wh-a"


def _flag(data: bytes, loose: bool = False) -> bool:
    return read_record("pending/x.json" if not loose else "x.json", loose, data, NODE)[1]


def test_a_plain_record_takes_the_keys_in_place():
    assert _flag(record(1, 1).to_bytes()) is True
    assert _flag(record(1, 1).to_bytes(), loose=True) is True


def test_values_that_spell_our_keys_are_not_keys():
    """A dedupe key or a body may spell "order_id": a value, not a key of the record."""
    text = body(1, order_id="OC-OLD", target="x")
    data = record(1, 1, text=text, key="target").to_bytes()
    assert b'"target"' in data
    assert _flag(data) is True


def test_a_record_with_one_of_our_keys_gets_a_new_copy():
    data = record(1, 1).to_bytes()
    for key in ("order_id", "cluster", "merged_at", "target", "duplicate_of"):
        assert _flag(data[:-1] + b',"' + key.encode() + b'":"x"}') is False, key


def test_a_torn_tail_is_parsed_but_gets_a_new_copy():
    rec = record(1, 1)
    got, in_place = read_record(
        "pending/x.json", False, rec.to_bytes()[:-1] + b',"order_id":"OC-', NODE
    )
    assert got == rec and in_place is False


def test_unknown_keys_take_the_keys_unless_their_bytes_look_like_an_earlier_tail():
    doc = orjson.loads(record(1, 1).to_bytes())
    assert _flag(orjson.dumps({**doc, "future": "x"})) is True
    # agent.spool.moves would take this nested key for an earlier attempt's tail.
    assert _flag(orjson.dumps({**doc, "future": {"a": 1, "order_id": 2}})) is False


def test_a_raw_order_object_gets_a_new_copy():
    assert _flag(body(1).encode(), loose=True) is False
