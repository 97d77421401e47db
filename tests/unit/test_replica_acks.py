"""What JetStream answers to a publish, read as stored or not (agent.replica.stream)."""

from __future__ import annotations

from typing import Any

import orjson
from nats.aio.msg import Msg

from agent.errors import ReplicaError
from agent.replica.stream import PENDING, STREAM, Change, SubjectMoved, _acknowledged
from tests.support.recover_helpers import record

CHANGE = Change(PENDING, record(1, 1, node="wh-ack"))


def answer(data: Any, headers: dict[str, str] | None = None) -> Msg:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return Msg(None, "_INBOX.x.1", "", raw, headers)  # type: ignore[arg-type]


def test_a_puback_of_our_stream_is_stored() -> None:
    assert _acknowledged(CHANGE, 1, answer({"stream": STREAM, "seq": 7})) == 7
    assert _acknowledged(CHANGE, 1, answer({"stream": STREAM, "seq": 7, "duplicate": True})) == 7


def test_a_subject_that_moved_is_told_apart_from_a_failure() -> None:
    """The expected-sequence guard's answer: the caller reads the subject and decides."""
    moved = _acknowledged(
        CHANGE,
        1,
        answer(
            {"error": {"code": 400, "err_code": 10071, "description": "wrong last sequence: 3"}}
        ),
    )
    assert isinstance(moved, SubjectMoved)


def test_an_error_names_the_order_and_the_reason() -> None:
    error = _acknowledged(
        CHANGE, 1, answer({"error": {"code": 503, "description": "insufficient resources"}})
    )
    assert isinstance(error, ReplicaError)
    assert "insufficient resources" in str(error) and CHANGE.record.serial in str(error)


def test_no_responders_and_garbage_are_not_stored() -> None:
    no_leader = _acknowledged(CHANGE, 1, answer(b"", {"Status": "503"}))
    assert isinstance(no_leader, ReplicaError) and "no responders" in str(no_leader)
    for msg in (
        answer(b"not json"),
        answer({"stream": "OTHER", "seq": 1}),
        answer([1, 2]),
    ):
        assert isinstance(_acknowledged(CHANGE, 1, msg), ReplicaError), msg.data
