"""The console in a real browser (Debian's chromium + chromium-driver, Selenium): against a
real agent subprocess and the sandbox centers (pytest -m browser; CI).

What an operator and a customer-service agent would check: the mode goes normal ->
offline -> normal as the clusters fail and return, the pending count rises and drains,
a lookup by platform order number finds the buffered order and later the merged one,
a wrong token says so, the page fits a phone, and the browser logs no errors.
Screenshots land in test-artifacts/screenshots/ (EDGE_SCREENSHOT_DIR moves them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.drill.agent_proc import AgentSubprocess, drill_config, write_config_file
from agent.drill.sandbox import Sandbox
from agent.sandbox.nats_cluster import NatsCluster
from agent.sandbox.servers import free_port
from tests.support import host_tools
from tests.support.chain_fakes import Downstream, chain_section
from tests.support.harness import ROOT, wait_for
from tests.support.nats_cluster import ensure_nats_server

pytestmark = pytest.mark.browser

TOKEN = "cs-console-token"
SHOTS = Path(os.environ.get("EDGE_SCREENSHOT_DIR", ROOT / "test-artifacts" / "screenshots"))
CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags chromium dials out (updates, sync, field
# trials); this closed network refuses it and the log fills with errors.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-default-browser-check",
)


# A CJK font, so the Chinese page renders in screenshots (a user's browser has one).
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def ensure_chromium() -> None:
    if not all(os.path.exists(p) for p in (CHROMIUM, DRIVER, CJK_FONT)):
        host_tools.apt_get("update", "-qq", timeout=600)
        host_tools.apt_get(
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "chromium",
            "chromium-driver",
            "fonts-wqy-microhei",
            timeout=1200,
        )


class Browser:
    """One headless chromium through chromedriver; every call off the event loop (the
    sandbox centers live in it)."""

    def __init__(self, lang: str, phone: bool, tz: str | None = None) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="edge-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_experimental_option("prefs", {"intl.accept_languages": lang})
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        if phone:
            options.add_experimental_option(
                "mobileEmulation",
                {"deviceMetrics": {"width": 360, "height": 780, "pixelRatio": 2.0}},
            )
        else:
            options.add_argument("--window-size=1280,1000")
        self.phone = phone
        # TZ: the time zone the page shows its dates in (chromium reads it at start).
        env = {**os.environ, "TZ": tz} if tz else None
        self.driver = webdriver.Chrome(options=options, service=Service(DRIVER, env=env))
        self.driver.set_page_load_timeout(20)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def js(self, script: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, script, *args)

    async def text(self, element_id: str) -> str:
        return str(
            await self.js(
                "const e = document.getElementById(arguments[0]); return e ? e.textContent : ''",
                element_id,
            )
        )

    async def attr(self, element_id: str, name: str) -> str | None:
        value = await self.js(
            "const e = document.getElementById(arguments[0]);"
            "return e ? e.getAttribute(arguments[1]) : null",
            element_id,
            name,
        )
        return None if value is None else str(value)

    async def fill(self, element_id: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        def do() -> None:
            el = self.driver.find_element(By.ID, element_id)
            el.clear()
            el.send_keys(value)

        await asyncio.to_thread(do)

    async def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        await asyncio.to_thread(lambda: self.driver.find_element(By.CSS_SELECTOR, selector).click())

    async def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name

        def full_page() -> None:
            # The whole page, not only the viewport: size the window to the document.
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            width = self.driver.execute_script("return window.innerWidth")
            self.driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500},
            )
            self.driver.save_screenshot(str(path))
            if self.phone:  # back to the phone's viewport (clearing would drop the emulation)
                self.driver.execute_cdp_cmd(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": True},
                )
            else:
                self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        await asyncio.to_thread(full_page)
        return path

    def errors(self) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = self.driver.get_log("browser")
        return [e for e in logs if e.get("level") == "SEVERE"]

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll an async predicate until truthy or the deadline passes (no blind sleeps)."""
    return await wait_for(predicate, timeout, what, interval=0.1)


@pytest.fixture
def browsers() -> Iterator[list[Browser]]:
    ensure_chromium()
    made: list[Browser] = []
    yield made
    for b in made:
        b.quit()


@pytest.fixture
async def agent(tmp_path: Path, sandbox: Sandbox) -> AsyncIterator[AgentSubprocess]:
    port = free_port()
    config = drill_config(tmp_path, sandbox, port)
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    config["auth"] = {"tokens_file": str(tokens)}
    config["sms"]["timeout_s"] = 1  # a gateway slower than this leaves a notice ambiguous
    path = write_config_file(tmp_path / "agent.toml", config)
    proc = AgentSubprocess(path, tmp_path / "agent.log", f"http://127.0.0.1:{port}", cwd=ROOT)
    proc.start()
    try:
        async with aiohttp.ClientSession() as session:
            await proc.wait_ready(session)
        yield proc
    finally:
        proc.kill(15)
        await proc.reap()


async def post(
    session: aiohttp.ClientSession, url: str, n: int, phone: str | None, **extra: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "channel_id": "douyin",
        "channel_order_id": str(n),
        "amount": "9.90",
        **extra,
    }
    if phone:
        doc["customer_phone"] = phone
    async with session.post(
        f"{url}/v1/orders",
        data=orjson.dumps(doc),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    ) as r:
        body: dict[str, Any] = await r.json()
        assert r.status in (201, 202), body
        return body


def expected_errors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Severe console entries that are NOT the lookups the test made fail on purpose
    (chromium logs every 401/404 answer of a fetch as a failed resource)."""
    return [
        e
        for e in entries
        if not (
            "/v1/orders/" in e.get("message", "")
            and ("status of 401" in e["message"] or "status of 404" in e["message"])
        )
    ]


async def test_console_through_an_outage(
    agent: AgentSubprocess, sandbox: Sandbox, browsers: list[Browser]
) -> None:
    desktop = await asyncio.to_thread(Browser, "en-US,en", False)
    browsers.append(desktop)
    phone = await asyncio.to_thread(Browser, "zh-CN,zh;q=0.9,en;q=0.5", True)
    browsers.append(phone)
    for b in (desktop, phone):
        await b.call(b.driver.get, agent.url + "/")

    async def mode_is(b: Browser, mode: str) -> bool:
        return await b.attr("mode", "data-mode") == mode

    # 1. Normal: both browsers show it, each in its own language (Accept-Language).
    await until(lambda: mode_is(desktop, "normal"), "desktop: mode normal")
    await until(lambda: mode_is(phone, "normal"), "phone: mode normal")
    assert await desktop.text("mode") == "normal"
    assert await phone.text("mode") == "正常"
    assert await desktop.js("return document.documentElement.lang") == "en"
    assert await phone.js("return document.documentElement.lang") == "zh-CN"
    assert "primary" in await desktop.text("clusters")
    assert (
        await desktop.js(
            "return document.querySelectorAll('.cluster[data-healthy=\"true\"]').length"
        )
        == 2
    )
    assert await desktop.js("return document.getElementById('replica-card').hidden") is True

    async with aiohttp.ClientSession() as session:
        forwarded = await post(session, agent.url, 1, None)
        assert forwarded["status"] == "forwarded"

        # 2. Both clusters fail: offline; orders are buffered and the count rises.
        for name in ("primary", "standby"):
            await sandbox.centers[name].go_down()
        await until(lambda: mode_is(desktop, "offline"), "desktop: mode offline")
        await until(lambda: mode_is(phone, "offline"), "phone: mode offline")
        assert await phone.text("mode") == "离线"
        assert (
            await desktop.js(
                "return document.querySelectorAll('.cluster[data-healthy=\"false\"]').length"
            )
            == 2
        )
        buffered = [await post(session, agent.url, n, f"1380013{n:04d}") for n in range(10, 22)]
        assert all(b["status"] == "buffered" for b in buffered)

        async def pending_shown() -> bool:
            return await desktop.text("pending") == "12"

        await until(pending_shown, "desktop: 12 pending")
        assert "offline" in await desktop.text("history")

        # 3. Customer service: the platform order number, no token yet -> asked for it.
        await desktop.fill("q-channel", "douyin")
        await desktop.fill("q", "15")
        await desktop.click("#lookup button[type=submit]")
        await until(
            lambda: desktop.js("return !document.getElementById('token-form').hidden"),
            "the token form",
        )
        assert await desktop.attr("token-msg", "data-kind") == "missing"
        # A wrong token: a clear message, nothing shown.
        await desktop.fill("token", "not-the-token")
        await desktop.click("#token-form button[type=submit]")

        async def wrong_said() -> bool:
            return await desktop.attr("token-msg", "data-kind") == "wrong"

        await until(wrong_said, "the wrong-token message")
        assert "Wrong API token" in await desktop.text("token-msg")
        assert await desktop.text("result") == ""
        # The right one: the buffered order with its serial and the SMS (masked).
        await desktop.fill("token", TOKEN)
        await desktop.click("#token-form button[type=submit]")

        async def order_state() -> str | None:
            return await desktop.attr("order", "data-state")

        await until(lambda: _is(order_state, "buffered"), "the lookup: buffered")
        serial = buffered[5]["serial"]
        assert (
            await desktop.js("return document.querySelector('[data-field=serial]').textContent")
            == serial
        )

        async def sms_sent() -> bool:
            await desktop.click("#lookup button[type=submit]")  # look again, token kept
            text = str(
                await desktop.js(
                    "const e = document.querySelector('[data-field=sms]');"
                    "return e ? e.textContent : ''"
                )
            )
            return "sent to 138****0015" in text

        await until(sms_sent, "the lookup: SMS sent, phone masked")
        page = str(await desktop.js("return document.body.innerText"))
        assert "13800130015" not in page
        assert await desktop.js("return sessionStorage.getItem('edgeAgentToken')") == TOKEN

        # The phone: same facts, fits 360 px without sideways scrolling.
        await until(lambda: _is(lambda: phone.text("pending"), "12"), "phone: 12 pending")
        assert await phone.js("return window.innerWidth") == 360
        assert (
            await phone.js("return document.documentElement.scrollWidth <= window.innerWidth")
            is True
        )
        await until(lambda: _contains(lambda: desktop.text("sms"), "12"), "desktop: 12 SMS")
        assert await desktop.js("return document.getElementById('sms-alert').hidden") is True
        # The SMS gateway answers too late for one notice: ambiguous, called out with what
        # to do, never resent.
        sandbox.sms.delay_s = 2.5
        late = await post(session, agent.url, 40, "13800130040")
        assert late["sms"] == "queued"

        async def ambiguous_called_out() -> bool:
            return bool(
                await desktop.js(
                    "const a = document.getElementById('sms-alert');"
                    "return !a.hidden && a.textContent.includes('ambiguous')"
                    " && a.textContent.includes('OutId')"
                )
            )

        await until(ambiguous_called_out, "desktop: the ambiguous SMS callout")
        await until(
            lambda: phone.js("return !document.getElementById('sms-alert').hidden"),
            "phone: the ambiguous SMS callout",
        )
        sandbox.sms.delay_s = 0
        shots = [
            await desktop.screenshot("console-desktop-offline.png"),
            await phone.screenshot("console-phone-offline.png"),
        ]

        # 4. The clusters return: normal again, the buffer drains to 0.
        await sandbox.restore()
        await until(lambda: mode_is(desktop, "normal"), "desktop: back to normal", 30)
        await until(lambda: _is(lambda: desktop.text("pending"), "0"), "desktop: drained", 30)
        await until(lambda: mode_is(phone, "normal"), "phone: back to normal", 30)
        await until(lambda: _is(lambda: phone.text("pending"), "0"), "phone: drained", 30)
        assert sum(sandbox.creates().values()) == 14  # 1 forwarded, 13 drained
        assert sandbox.sms.per_serial()[late["serial"]] == 1  # the late one, never resent
        hist = await desktop.text("history")
        assert "offline → normal" in hist

        # The same lookup now finds the merged order, with the center's order id.
        await desktop.click("#lookup button[type=submit]")
        await until(lambda: _is(order_state, "merged"), "the lookup: merged")
        order_id = await desktop.js(
            "return document.querySelector('[data-field=order_id]').textContent"
        )
        key = "douyin:15"
        assert order_id in {
            sandbox.centers[c].orders.get(key, ("?",))[0] for c in ("primary", "standby")
        }
        # An unknown order number says so.
        await desktop.fill("q", "no-such-order")
        await desktop.click("#lookup button[type=submit]")
        await until(
            lambda: _contains(lambda: desktop.text("lookup-error"), "No order found"), "not found"
        )
        # The language switch.
        await desktop.click("#lang-zh")
        assert await desktop.text("mode") == "正常"
        assert await phone.js("return window.innerWidth") == 360  # still the phone
        assert (
            await phone.js("return document.documentElement.scrollWidth <= window.innerWidth")
            is True
        )
        shots += [
            await desktop.screenshot("console-desktop-normal-zh.png"),
            await phone.screenshot("console-phone-normal.png"),
        ]
    for path in shots:
        assert path.stat().st_size > 10_000, path
    for b in (desktop, phone):
        errors = expected_errors(await asyncio.to_thread(b.errors))
        assert errors == [], errors


# A date as the console writes it, in both languages: ISO 8601 with the local offset.
ISO_LOCAL = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d"


async def test_console_when_the_agent_dies_and_after_the_outage(
    agent: AgentSubprocess, sandbox: Sandbox, browsers: list[Browser], tmp_path: Path
) -> None:
    """kill -9 of the agent: the last figures stay, greyed, under "not answering since";
    nothing green remains. Back when it answers. Also the "after the outage" panel, the
    rejected/ count, the version, ISO dates with the offset, and a zh view with no raw
    English state names."""
    ds = await Downstream(center=sandbox.centers["primary"]).start()
    try:
        await _restart_with_chain(agent, ds, tmp_path)
        b = await asyncio.to_thread(Browser, "en-US,en", False, "Asia/Shanghai")
        browsers.append(b)
        await b.call(b.driver.get, agent.url + "/")
        await until(lambda: _is(lambda: b.attr("mode", "data-mode"), "normal"), "mode normal")
        assert re.fullmatch(ISO_LOCAL, await b.text("updated"))
        assert (await b.text("updated")).endswith("+08:00")
        assert re.search(r"\d\d:\d\d:\d\d \+08:00", await b.text("mode-since"))
        assert f"version {agent_version()}" in await b.text("version")
        # No chain activity yet: the panel shows each step at 0.
        await until(lambda: b.js("return !document.getElementById('chain-card').hidden"), "chain")

        # An outage with orders: buffered, then drained; the ERP posts one amount truncated.
        ds.amount_override["3"] = "9.00"  # 9.90 with its decimals cut off
        async with aiohttp.ClientSession() as session:
            for name in ("primary", "standby"):
                await sandbox.centers[name].go_down()
            await until(lambda: _is(lambda: b.attr("mode", "data-mode"), "offline"), "offline")
            for n in range(1, 5):
                doc = await post(session, agent.url, n, None, total_amount="9.90")
                assert doc["status"] == "buffered"
            # A file the inbox refuses for good: rejected/ (ops must review it).
            inbox = tmp_path / "spool" / "inbox"
            (inbox / ".junk.part").write_bytes(b"\x00 not json")
            os.rename(inbox / ".junk.part", inbox / "junk.json")
            await sandbox.restore()
            await until(lambda: _is(lambda: b.text("pending"), "0"), "drained", 30)

            async def finance_failed() -> bool:
                return bool(
                    await b.js(
                        "const c = document.querySelector("
                        "'#chain tr[data-step=finance] td[data-state=failed]');"
                        "return c !== null && c.textContent === '1' && c.classList.contains('warn')"
                    )
                )

            await until(finance_failed, "finance: 1 failed, highlighted", 30)
            # The orders behind the red figure, with what was wrong (behind the token).
            await b.js("sessionStorage.setItem('edgeAgentToken', arguments[0])", TOKEN)
            await b.click("#chain-list")

            async def problem_listed() -> str:
                return str(
                    await b.js(
                        "const d = document.querySelector("
                        "'#problems tr[data-step=finance] [data-field=detail]');"
                        "return d ? d.textContent : ''"
                    )
                )

            await until(
                lambda: _contains(
                    problem_listed, '/amount is "9.00" downstream, the order says "9.90"'
                ),
                "the problem, both values",
            )
            await until(lambda: _is(lambda: b.text("rejected"), "1"), "1 rejected file", 20)
            assert await b.js("return !document.getElementById('rejected-help').hidden")

            # A cluster that does not answer: a short text, the library's words on demand.
            await sandbox.centers["standby"].go_down()

            async def standby_error() -> str:
                return str(
                    await b.js(
                        "const e = document.querySelector('.cluster[data-cluster=standby] .err');"
                        "return e ? e.dataset.kind : ''"
                    )
                )

            await until(lambda: _in(standby_error, {"refused", "http", "timeout", "reset"}), "err")
            raw = await b.js(
                "return document.querySelector('.cluster[data-cluster=standby] .err code')"
                ".textContent"
            )
            shown = await b.js(
                "return document.querySelector('.cluster[data-cluster=standby] .err').innerText"
            )
            # The library's string is one click away (a closed <details>), not on the card.
            assert raw and str(raw) not in str(shown), (raw, shown)
            await sandbox.centers["standby"].come_up()
            await until(
                lambda: b.js("return document.querySelectorAll('.badge.ok').length >= 2"),
                "healthy badges",
            )

            # kill -9 of the agent: the last data stays, greyed, with since when.
            before = await b.text("pending")
            agent.kill(signal.SIGKILL)
            await agent.reap()
            await until(
                lambda: _is(lambda: b.js("return document.body.dataset.stale"), "true"),
                "the dead-agent view",
            )
            banner = await b.text("conn")
            assert re.search(r"not answering since \d\d:\d\d:\d\d \+08:00", banner), banner
            assert await b.attr("mode", "data-mode") == "stale"
            assert "last known" in await b.text("mode")
            assert await b.text("pending") == before  # the last figures, not blanks
            assert await b.js("return document.querySelectorAll('.badge.ok').length") == 0
            mode_color = await b.js(
                "return getComputedStyle(document.getElementById('mode')).color"
            )
            assert mode_color not in ("rgb(21, 128, 61)",), mode_color  # not the green of normal
            assert "grayscale" in str(
                await b.js("return getComputedStyle(document.getElementById('clusters')).filter")
            )
            shots = [await b.screenshot("console-desktop-dead-agent.png")]
            # In Chinese: the banner and every state, with no raw English state name.
            await b.click("#lang-zh")
            assert "代理自" in await b.text("conn") and "无响应" in await b.text("conn")
            page = str(await b.js("return document.querySelector('main').innerText"))
            bare = re.sub(r"https?://\S+|\S*/\S*|edge-recover|--\w+|systemctl|journalctl", "", page)
            for word in (
                "normal",
                "offline",
                "healthy",
                "down",
                "buffered",
                "verified",
                "pending",
                "failed",
                "overdue",
                "last known",
                "since",
            ):
                m = re.search(rf"\b{word}\b", bare)
                assert m is None, (word, bare[max(0, m.start() - 120) : m.end() + 60])
            await b.click("#lang-en")

            # Back: the agent answers again, normal and green.
            agent.start()
            await agent.wait_ready(session)
            await until(
                lambda: _is(lambda: b.js("return document.body.dataset.stale"), "false"),
                "back to live data",
                30,
            )
            await until(lambda: _is(lambda: b.attr("mode", "data-mode"), "normal"), "normal", 30)
            assert await b.js("return document.getElementById('conn').hidden") is True
            assert await b.js("return document.querySelectorAll('.badge.ok').length") >= 2
            await b.click("#lang-zh")
            await until(finance_failed, "finance failed after the restart (durable ledger)", 30)
            shots.append(await b.screenshot("console-desktop-chain-zh.png"))
        for path in shots:
            assert path.stat().st_size > 10_000, path
        errors = [
            e
            for e in expected_errors(await asyncio.to_thread(b.errors))
            if "/status" not in e.get("message", "")  # the dead agent: refused, on purpose
        ]
        assert errors == [], errors
    finally:
        await ds.stop()


async def test_console_shows_the_replicas_health(
    sandbox: Sandbox, browsers: list[Browser], tmp_path: Path
) -> None:
    """[replication] on, a real three-node nats-server cluster: the replica panel shows
    healthy and connected, the last write as ISO with the offset; with two nodes killed
    and required = false, an order is taken on this disk alone: unhealthy, the count of
    orders not replicated in red with its warning, the last error short (the library's
    words on demand); kill -9 of the agent greys the panel like the rest."""
    ensure_nats_server()
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start()
    proc = None
    try:
        await cluster.wait_ready()
        port = free_port()
        config = drill_config(tmp_path, sandbox, port)
        config["replication"] = {
            "enabled": True,
            "servers": cluster.urls,
            "replicas": 3,
            "required": False,
            "timeout_s": 1,
        }
        path = write_config_file(tmp_path / "agent.toml", config)
        proc = AgentSubprocess(path, tmp_path / "agent.log", f"http://127.0.0.1:{port}", cwd=ROOT)
        proc.start()
        async with aiohttp.ClientSession() as session:
            await proc.wait_ready(session)
            b = await asyncio.to_thread(Browser, "en-US,en", False, "Asia/Shanghai")
            browsers.append(b)
            await b.call(b.driver.get, proc.url + "/")

            def card(name: str) -> Callable[[], Any]:
                return lambda: b.js(
                    "return document.getElementById('replica-card').dataset[arguments[0]]", name
                )

            await until(lambda: _is(card("healthy"), "true"), "the replica panel: healthy")
            assert await b.js("return document.getElementById('replica-card').hidden") is False
            head = await b.text("replica-head")
            assert "healthy" in head and "connected" in head and "not required" in head
            assert await b.js("return document.getElementById('replica-error').hidden") is True

            def field(name: str) -> Callable[[], Any]:
                return lambda: b.js(
                    "const d = document.querySelector('#replica [data-field=' + arguments[0]"
                    " + '] dd'); return d ? d.textContent + '|' + d.className : ''",
                    name,
                )

            # An order during an outage: stored on the replica; its time shown with +08:00.
            for name in ("primary", "standby"):
                await sandbox.centers[name].go_down()
            assert (await post(session, proc.url, 1, None))["status"] == "buffered"
            await until(
                lambda: _matches(field("last_ok"), ISO_LOCAL + r"\|"), "the last write shown"
            )
            assert "+08:00" in str(await field("last_ok")())
            assert await field("unreplicated")() == "0|"

            # Two of three nodes killed, required = false: taken on this disk alone.
            for node in cluster.nodes[:2]:
                await asyncio.to_thread(cluster.kill, node)
            assert (await post(session, proc.url, 2, None))["status"] == "buffered"
            await until(lambda: _is(field("unreplicated"), "1|warn"), "1 not replicated, red")
            await until(lambda: _is(card("healthy"), "false"), "the replica panel: unhealthy")
            assert "unhealthy" in await b.text("replica-head")
            assert "on this server's disk only" in await b.text("replica-alert")
            assert await b.js("return document.getElementById('replica-alert').hidden") is False
            await until(
                lambda: b.js("return !document.getElementById('replica-error').hidden"),
                "the replica's last error",
            )
            kind = await b.js("return document.querySelector('#replica-error .err').dataset.kind")
            raw = await b.js(
                "return document.querySelector('#replica-error .err code').textContent"
            )
            shown = await b.js("return document.querySelector('#replica-error .err').innerText")
            assert kind != "other" and raw and str(raw) not in str(shown), (kind, raw, shown)
            await b.click("#lang-zh")
            assert "异常" in await b.text("replica-head")
            assert "仅存于本服务器磁盘" in await b.text("replica-alert")
            await b.click("#lang-en")
            shot = await b.screenshot("console-desktop-replica.png")
            assert shot.stat().st_size > 10_000

            # kill -9 of the agent: the panel keeps its last figures, greyed, nothing green.
            proc.kill(signal.SIGKILL)
            await proc.reap()
            await until(
                lambda: _is(lambda: b.js("return document.body.dataset.stale"), "true"),
                "the dead-agent view",
            )
            assert await field("unreplicated")() == "1|warn"
            assert (
                await b.js("return document.querySelectorAll('#replica-head .badge.stale').length")
                == 2
            )
            assert await b.js("return document.querySelectorAll('.badge.ok').length") == 0
            assert "grayscale" in str(
                await b.js("return getComputedStyle(document.getElementById('replica')).filter")
            )
        errors = [
            e
            for e in await asyncio.to_thread(b.errors)
            if "/status" not in e.get("message", "")  # the dead agent: refused, on purpose
        ]
        assert errors == [], errors
    finally:
        if proc is not None:
            proc.cleanup()
        await asyncio.to_thread(cluster.stop)


async def _matches(fn: Callable[[], Any], pattern: str) -> bool:
    return re.match(pattern, str(await fn())) is not None


def agent_version() -> str:
    from agent import __version__

    return __version__


async def _restart_with_chain(agent: AgentSubprocess, ds: Any, tmp_path: Path) -> None:
    """The fixture's agent, restarted with [chain] against the downstream fakes."""
    agent.kill(15)
    await agent.reap()
    config = tomllib.loads(agent.config.read_text())
    config["chain"] = chain_section(ds)
    write_config_file(agent.config, config)
    agent.start()
    async with aiohttp.ClientSession() as session:
        await agent.wait_ready(session)


async def _in(fn: Callable[[], Any], want: set[str]) -> bool:
    return str(await fn()) in want


async def _is(fn: Callable[[], Any], want: Any) -> bool:
    return bool(await fn() == want)


async def _contains(fn: Callable[[], Any], want: str) -> bool:
    return want in str(await fn())
