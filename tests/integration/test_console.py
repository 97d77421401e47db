"""The console page (issue 15) and what it reads: served open, its data behind the token."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from agent import console
from tests.support.fakes import FakeCenter
from tests.support.harness import order, wait_for


def test_language_follows_accept_language():
    assert console.pick_lang("zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert console.pick_lang("en-US,en;q=0.9,zh-CN;q=0.5") == "en"
    assert console.pick_lang("de-DE,zh-TW;q=0.4") == "zh"
    assert console.pick_lang("") == "en"
    assert b'data-lang="zh"' in console.page("zh-CN")


async def test_page_and_assets_are_open_while_lookups_need_the_token(
    make_agent, center: FakeCenter, tmp_path: Path
):
    tokens = tmp_path / "tokens"
    tokens.write_text("cs-token\n")
    agent = await make_agent(center.url, auth={"tokens_file": str(tokens)})
    for path, kind in (
        ("/", "text/html"),
        ("/console/console.js", "application/javascript"),
        ("/console/console.css", "text/css"),
    ):
        async with agent.session.get(agent.url + path, headers={"Accept-Language": "zh-CN"}) as r:
            assert r.status == 200, path
            assert r.content_type == kind
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            body = await r.read()
    async with agent.session.get(agent.url + "/") as r:
        assert b'data-lang="en"' in await r.read()
    async with agent.session.get(agent.url + "/", headers={"Accept-Language": "zh"}) as r:
        assert b'data-lang="zh"' in await r.read()
    assert body
    status, _ = await agent.get("/console/secret.txt")
    assert status == 404
    status, _ = await agent.get("/v1/orders/by-key/douyin%3A1")
    assert status == 401


async def test_lookup_says_whether_an_sms_went_out_with_the_phone_masked(
    make_agent, center: FakeCenter
):
    await center.go_down()
    agent = await make_agent(center.url)
    status, body = await agent.post(orjson.dumps(order(7, customer_phone="13812345678")))
    assert status == 202 and body["sms"] == "queued"
    status, _ = await agent.post(orjson.dumps(order(8)))
    assert status == 202

    async def sent() -> dict | None:
        _, found = await agent.get("/v1/orders/by-key/douyin%3A7")
        return found if found["sms"] and found["sms"]["state"] == "sent" else None

    found = await wait_for(sent, what="the SMS (log provider) to be sent")
    assert found["sms"]["phone"] == "138****5678"
    assert "13812345678" not in orjson.dumps(found).decode()
    _, by_serial = await agent.get(f"/v1/orders/{body['serial']}")
    assert by_serial["sms"]["state"] == "sent" and by_serial["state"] == "buffered"
    _, none = await agent.get("/v1/orders/by-key/douyin%3A8")
    assert none["sms"] is None


async def test_status_has_mode_history_drain_rate_and_eta(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url)
    for n in range(5):
        assert (await agent.post(order(n)))[0] == 202
    _, st = await agent.get("/status")
    assert st["mode"] == "offline" and st["pending"] == 5
    assert st["drain_eta_s"] is None  # nothing drains: no estimate, not a made-up one
    assert st["mode_history"][0]["reason"] == "agent started"
    assert st["max_bytes"] == agent.cfg.buffer.max_bytes
    await center.come_up()

    async def drained() -> dict | None:
        _, s = await agent.get("/status")
        return s if s["pending"] == 0 and s["mode"] == "normal" else None

    st = await wait_for(drained, what="the drain")
    assert st["drain_eta_s"] == 0.0
    assert st["mode_history"][-1]["to"] == "normal"
    assert st["mode_history"][-1]["from"] == "offline"
    _, text = await agent.get("/metrics")
    for name in (
        'edge_mode{mode="normal"} 1.0',
        "edge_oldest_pending_age_seconds",
        "edge_buffer_max_bytes",
        "edge_agent_unclean_start 0.0",
        "process_start_time_seconds",
    ):
        assert name in text, name


STRINGS = Path(console.__file__).parent / "strings.json"
CONSOLE_JS = Path(console.__file__).parent / "console.js"
# Words the API and the config use for states and modes: never shown raw in the zh view.
RAW_STATES = [
    "normal",
    "standby",
    "offline",
    "healthy",
    "down",
    "refusing",
    "forwarded",
    "buffered",
    "merged",
    "rejected",
    "queued",
    "sending",
    "sent",
    "failed",
    "suppressed",
    "skipped",
    "ambiguous",
    "verified",
    "pending",
    "overdue",
    "primary",
    "error",
    "details",
    "version",
]


def test_every_english_text_has_its_chinese_one_and_no_raw_state_name() -> None:
    table = orjson.loads(STRINGS.read_bytes())
    en, zh = table["en"], table["zh"]
    assert set(en) == set(zh), {"missing in zh": set(en) - set(zh), "not in en": set(zh) - set(en)}
    for key, text in zh.items():
        assert text.strip(), key
        # Quoted log lines, directory names and commands stay as they are typed.
        bare = re.sub(r'"[^"]*"|\S*/\S*|edge-recover|--\w+|systemctl|journalctl', "", text)
        raw = [w for w in RAW_STATES if re.search(rf"\b{w}\b", bare, re.IGNORECASE)]
        assert raw == [], (key, text, raw)
        # Same placeholders in both languages.
        assert set(re.findall(r"\{\w+\}", text)) == set(re.findall(r"\{\w+\}", en[key])), key


def test_every_text_the_script_asks_for_exists() -> None:
    """Keys the script builds (t("state_" + s), t("err_" + kind) ...) and plain ones."""
    en = orjson.loads(STRINGS.read_bytes())["en"]
    js = CONSOLE_JS.read_text()
    plain = set(re.findall(r'\bt\("(\w+)"(?!\s*\+)', js))
    html = (Path(console.__file__).parent / "index.html").read_text()
    plain |= set(re.findall(r'data-t="(\w+)"', html))
    assert plain - set(en) == set(), plain - set(en)
    built = {
        "state_": ("queued", "sending", "sent", "failed", "suppressed", "skipped", "ambiguous"),
        "os_": ("forwarded", "buffered", "merged", "rejected"),
        "st_": ("forwarded", "buffered", "merged", "rejected"),
        "chain_": ("verified", "pending", "failed", "overdue"),
        "help_": ("normal", "standby", "offline"),
    }
    for prefix, names in built.items():
        assert f't("{prefix}" +' in js, prefix
        for name in names:
            assert prefix + name in en, prefix + name
    kinds = re.findall(r'\["(\w+)", /', js)
    assert kinds and all(f"err_{k}" in en for k in [*kinds, "other"]), kinds


async def test_strings_are_served_with_the_page(make_agent, center: FakeCenter) -> None:
    agent = await make_agent(center.url)
    async with agent.session.get(agent.url + "/console/strings.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert set(orjson.loads(await r.read())) == {"en", "zh"}
