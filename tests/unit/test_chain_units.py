"""Chain verification's pure parts: the decimal comparison table, templates, pointers,
and the [chain] config with its errors naming the key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.base.template import (
    Absent,
    Template,
    TemplateError,
    Values,
    load_json,
    parse_pointer,
    resolve,
)
from agent.chain.compare import same_value
from agent.config import load_config, parse_config
from agent.errors import ConfigError

# (downstream value, expected from the order, equal?)
DECIMAL_TABLE: list[tuple[Any, Any, bool]] = [
    ("199.10", Decimal("199.1"), True),
    (Decimal("199.1"), "199.10", True),
    ("199.10", "199.1", True),
    (Decimal("199.10"), Decimal("199.1"), True),
    (199, "199.10", False),  # the truncated amount
    ("199", "199.10", False),
    (Decimal("199.1"), "199.11", False),
    (199, "199", True),
    (199, "199.00", True),
    ("1e2", 100, True),
    ("-0.0", 0, True),
    ("0.1", Decimal("0.10000000000000000001"), False),  # no float rounding on the way
    ("CNY", "CNY", True),
    ("cny", "CNY", False),
    (" 199.10", "199.1", True),  # a numeric string with stray blanks is its number
    ("199.10x", "199.1", False),  # not a number: compared as text
    ("NaN", "NaN", True),  # not a number to us: text, equal as text
    (True, "true", True),
    (None, "null", True),
    ("", "0", False),
]


@pytest.mark.parametrize(("got", "expected", "equal"), DECIMAL_TABLE)
def test_equal_compares_exact_decimals_else_text(got: Any, expected: Any, equal: bool):
    assert same_value(got, expected) is equal
    assert same_value(expected, got) is equal


def test_answers_are_read_without_rounding():
    doc = load_json(b'{"amount": 199.10, "big": 12345678901234567.891}')
    assert str(doc["amount"]) == "199.10"
    assert same_value(doc["big"], "12345678901234567.891")
    assert not same_value(doc["big"], "12345678901234567.89")


def _values(body: str | None = None, **fields: str | None) -> Values:
    base: dict[str, str | None] = {
        "order_id": "OC-1",
        "serial": "S1",
        "dedupe_key": "dy:1",
        "channel_id": "dy",
        "channel_order_id": "1",
        "received_at": "2026-12-03T10:00:00.000+08:00",
    }
    base.update(fields)
    return Values(base, None if body is None else load_json(body))


def test_url_values_are_each_percent_encoded():
    t = Template.compile(
        "http://tms/api/tracks?order_no={order_id}&k={dedupe_key}&at={received_at}"
    )
    url = t.url(_values(order_id="A/B?c=d&e f#", dedupe_key="抖音:1"))
    assert url == (
        "http://tms/api/tracks?order_no=A%2FB%3Fc%3Dd%26e%20f%23&k="
        "%E6%8A%96%E9%9F%B3%3A1&at=2026-12-03T10%3A00%3A00.000%2B08%3A00"
    )


def test_body_values_are_json_escaped_and_amounts_keep_their_digits():
    t = Template.compile(
        '{"order_no": "{order_id}", "amount": "{order:/total_amount}", "note": "{order:/note}"}'
    )
    body = t.json_body(
        _values('{"total_amount": 199.10, "note": "a \\"quoted\\" \\\\ line\\n"}', order_id='x"y')
    )
    doc = load_json(body)
    assert doc == {"order_no": 'x"y', "amount": "199.10", "note": 'a "quoted" \\ line\n'}


def test_pointers_follow_rfc6901():
    doc = load_json('{"a/b": {"m~n": [10, {"x": 0}]}, "": 1}')
    assert resolve(doc, parse_pointer("/a~1b/m~0n/1/x")) == 0
    assert resolve(doc, parse_pointer("/")) == 1
    assert resolve(doc, parse_pointer("")) == doc
    for missing in ("/a~1b/m~0n/2", "/a~1b/m~0n/01", "/a~1b/m~0n/-", "/nope", "/a~1b/x/y"):
        with pytest.raises(Absent):
            resolve(doc, parse_pointer(missing))
    for bad in ("a/b", "/a~2"):
        with pytest.raises(TemplateError):
            parse_pointer(bad)


def test_order_pointer_placeholder_and_absent_values():
    t = Template.compile("http://erp/postings/{order:/items/0/sku}")
    assert t.url(_values('{"items": [{"sku": "K 1"}]}')) == "http://erp/postings/K%201"
    with pytest.raises(Absent):
        t.url(_values('{"items": []}'))
    with pytest.raises(Absent):
        t.url(_values(None))  # body unknown
    with pytest.raises(Absent):
        Template.compile("http://x/{order_id}").url(_values(order_id=None))


@pytest.mark.parametrize(
    "text",
    ["http://x/{orderid}", "http://x/{order_id:x}", "http://x/{order}", "http://x/{order:a}"],
)
def test_unknown_placeholders_are_refused(text: str):
    with pytest.raises(TemplateError):
        Template.compile(text)


def _chain(**over: Any) -> dict[str, Any]:
    step = {
        "name": "logistics",
        "check": "GET http://127.0.0.1:9/t?o={order_id}",
        "present": "/events/0",
    }
    step.update(over)
    return {
        "upstream": {"primary": "http://127.0.0.2"},
        "auth": {"tokens_file": ""},
        "chain": {"enabled": True, "step": [step]},
    }


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"check": "GET http://x/{orderid}"}, "chain.step[0] (logistics).check"),
        ({"check": "FETCH http://x/"}, "chain.step[0] (logistics).check"),
        ({"check": "GET ftp://x/"}, "chain.step[0] (logistics).check"),
        ({"present": "events"}, "chain.step[0] (logistics)"),
        ({"repair": "POST http://x/{nope}"}, "chain.step[0] (logistics).repair"),
        ({"repair_body": '{"n": "{order_id}"}'}, "chain.step[0] (logistics).repair_body"),
        ({"name": "bad name"}, "chain.step[0].name"),
        ({"colour": "red"}, "chain.step[0].colour"),
        ({"kind": "tests.support.chain_plugin:Step"}, "chain.step[0] (logistics).kind"),
        ({"token_file": "/nonexistent/token"}, "token_file"),
    ],
)
def test_bad_steps_are_config_errors_naming_the_key(override: dict[str, Any], key: str):
    with pytest.raises(ConfigError, match=__import__("re").escape(key)):
        parse_config(_chain(**override))


def test_chain_section_keys_are_checked():
    for key, value, msg in [
        ("deadline_h", 0, "chain.deadline_h"),
        ("recheck_interval_s", -1, "chain.recheck_interval_s"),
        ("concurrency", 0, "chain.concurrency"),
        ("speed", 1, "chain.speed"),
        ("enabled", "yes", "chain.enabled"),
    ]:
        data = _chain()
        data["chain"][key] = value
        with pytest.raises(ConfigError, match=msg):
            parse_config(data)
    data = _chain()
    data["chain"]["step"].append(dict(data["chain"]["step"][0]))
    with pytest.raises(ConfigError, match="must be unique"):
        parse_config(data)
    with pytest.raises(ConfigError, match="at least one"):
        parse_config(
            {
                "upstream": {"primary": "http://127.0.0.2"},
                "auth": {"tokens_file": ""},
                "chain": {"enabled": True},
            }
        )


def test_step_tokens_come_from_files_or_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "tok").write_text("# tms\nsecret-file\n")
    cfg = parse_config(_chain(token_file=str(tmp_path / "tok")))
    assert cfg.chain.steps[0].token == "secret-file"
    assert "secret-file" not in repr(cfg)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "chain-logistics").write_text("secret-cred\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert parse_config(_chain()).chain.steps[0].token == "secret-cred"


def test_the_shipped_example_config_documents_chain_disabled():
    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / "config" / "agent.toml"), tokens=False
    )
    assert cfg.chain.enabled is False
    assert [s.name for s in cfg.chain.steps] == ["logistics", "invoice", "finance"]
