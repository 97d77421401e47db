"""The buffer record round-trips any body byte for byte (property-based)."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.orders import parse_order
from agent.spool.file_proc import FileSteps
from agent.spool.record import BufferDirs, PendingRecord

# JSON values the channels send: nested objects, unicode, numbers as text or numbers.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.decimals(allow_nan=False, allow_infinity=False, places=2).map(str),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def raw_orders(draw: st.DrawFn) -> bytes:
    extra = draw(st.dictionaries(st.text(min_size=1), _json, max_size=5))
    doc = {
        **extra,
        "channel_id": draw(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=20)),
        "channel_order_id": draw(st.from_regex(r"[0-9A-Za-z-]{1,30}", fullmatch=True)),
    }
    # Whitespace must survive too: indent the text sometimes.
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 if draw(st.booleans()) else None)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=raw_orders(), phone=st.none() | st.text(max_size=20))
def test_record_round_trip_through_a_real_file(tmp_path: Path, raw: bytes, phone: str | None):
    order = parse_order(raw, None)
    record = PendingRecord(
        serial="WH-1-20261125-000000001",
        node_id="wh-1",
        received_at="2026-11-25T10:00:00.000+08:00",
        channel_id=order.channel_id,
        dedupe_key=order.dedupe_key,
        customer_phone=phone,
        body=raw.decode("utf-8"),
    )
    dirs = BufferDirs(tmp_path / "spool")
    dirs.ensure()
    out = io.BytesIO()
    steps = FileSteps(str(dirs.pending), 1, out)  # the pending/ writer process's steps
    steps.put(record.filename, record.to_bytes())
    steps.close()
    assert out.getvalue() == f"{record.filename} ok\n".encode()
    stored = (dirs.pending / record.filename).read_bytes()
    back = PendingRecord.from_bytes(stored)
    assert back == record
    assert back.raw_body == raw
    assert orjson.loads(stored)["body"] == raw.decode("utf-8")
    (dirs.pending / record.filename).unlink()


@given(body=st.text(min_size=1))
def test_any_text_body_round_trips_in_memory(body: str):
    record = PendingRecord(
        "S-20261125-000000001", "n", "2026-11-25T00:00:00+00:00", "c", "c:1", None, body
    )
    assert PendingRecord.from_bytes(record.to_bytes()).raw_body == body.encode("utf-8")
