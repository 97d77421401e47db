"""The alert rules and the dashboard against a real Prometheus scraping a real agent
(pytest -m prometheus; Debian's `prometheus` package, installed with apt-get if missing).

promtool checks and unit-tests ops/prometheus/edge-agent.rules.yml; then a Prometheus on
loopback (1 s scrapes and evaluations, a test copy of the rules with every `for:` and range
shortened) scrapes an agent subprocess while drill-like scenarios run against the sandbox
centers. A poller records every alert seen firing in each phase: each alert must fire in the
phase written for it, and none may fire outside the phases that allow it (normal operation
allows none). Every query of ops/grafana/edge-agent.json must then evaluate without error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.drill.agent_proc import AgentSubprocess, drill_config, write_config_file
from agent.drill.sandbox import Sandbox
from agent.sandbox.servers import free_port
from tests.support import host_tools
from tests.support.harness import ROOT, wait_for

pytestmark = pytest.mark.prometheus

RULES = ROOT / "ops" / "prometheus" / "edge-agent.rules.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "edge-agent.rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "edge-agent.json"

# The test copy of the rules: minutes become seconds so a scenario takes seconds.
FOR_S = 3
RANGES = {"[10m]": "[15s]", "[1h]": "[60s]", "[30m]": "[60s]", "[2m]": "[10s]"}
THRESHOLDS = {"edge_oldest_pending_age_seconds > 1800": "edge_oldest_pending_age_seconds > 5"}


def ensure_prometheus() -> None:
    host_tools.ensure({"prometheus": "prometheus", "promtool": "prometheus"})


def fast_rules(text: str) -> str:
    text, n = re.subn(r"for: \d+m", f"for: {FOR_S}s", text)
    assert n >= 6, "the rules' for: durations changed form; update the test"
    for old, new in {**RANGES, **THRESHOLDS}.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    ensure_prometheus()
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # promtool found every rule of the file (an alert it could not parse would be missing)
    assert f"SUCCESS: {RULES.read_text().count('- alert:')} rules found" in check.stdout
    unit = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


class Prom:
    """A real Prometheus on loopback: 1 s scrapes and rule evaluations."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "rules.yml").write_text(fast_rules(RULES.read_text()))
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  scrape_timeout: 900ms\n"
            "rule_files:\n  - rules.yml\n"
            "scrape_configs:\n  - job_name: edge-agent\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )

    async def get(
        self, session: aiohttp.ClientSession, path: str, params: dict[str, str] | None = None
    ) -> Any:
        async with session.get(self.url + path, params=params) as r:
            return await r.json()

    async def firing(self, session: aiohttp.ClientSession) -> set[str]:
        doc = await self.get(session, "/api/v1/alerts")
        return {a["labels"]["alertname"] for a in doc["data"]["alerts"] if a["state"] == "firing"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class Recorder:
    """Polls the alerts twice a second and records which fired in which phase."""

    def __init__(self, prom: Prom, session: aiohttp.ClientSession) -> None:
        self.prom, self.session = prom, session
        self.phase = "start"
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.now: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                self.now = await self.prom.firing(self.session)
                self.seen[self.phase] |= self.now
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def until(self, want: Callable[[set[str]], bool], what: str, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while not want(self.now):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.phase}: timed out waiting for {what}; firing: {sorted(self.now)}"
                )
            await asyncio.sleep(0.25)


async def wait(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    return await wait_for(predicate, timeout, what, interval=0.1)


async def test_alerts_fire_in_their_scenarios_and_not_in_normal_operation(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    ensure_prometheus()
    port = free_port()
    config = drill_config(tmp_path, sandbox, port)
    # The drill's chain checks run against the sandbox's ERP, which truncates one posting in
    # ten by design: EdgeChainStepFailed would fire in whichever phase follows a drain. The
    # chain alerts are proven by promtool (ops/prometheus/edge-agent.rules.test.yml).
    config.pop("chain", None)
    config["buffer"]["max_bytes"] = 12_000  # a few dozen orders fill it
    config["sms"]["timeout_s"] = 1  # the gateway below answers late: ambiguous
    path = write_config_file(tmp_path / "agent.toml", config)
    agent = AgentSubprocess(path, tmp_path / "agent.log", f"http://127.0.0.1:{port}", cwd=ROOT)
    (tmp_path / "prom").mkdir()
    prom = Prom(tmp_path / "prom", f"127.0.0.1:{port}")
    counter = iter(range(1_000_000))
    async with aiohttp.ClientSession() as session:
        rec = Recorder(prom, session)

        async def post(phone: bool = False) -> int:
            doc: dict[str, Any] = {
                "channel_id": "douyin",
                "channel_order_id": str(next(counter)),
                "amount": "9.90",
                "note": "x" * 200,
            }
            if phone:
                doc["customer_phone"] = "13800138000"
            async with session.post(
                f"{agent.url}/v1/orders",
                data=orjson.dumps(doc),
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
                return r.status

        async def status() -> dict[str, Any]:
            async with session.get(f"{agent.url}/status") as r:
                doc: dict[str, Any] = await r.json()
                return doc

        try:
            agent.start()
            await agent.wait_ready(session)
            await wait(lambda: _ready(prom, session), "Prometheus scraping the agent", 60)
            rec.start()

            # Normal operation, with traffic, for longer than every shortened for/range.
            rec.phase = "normal"
            t0 = time.monotonic()
            while time.monotonic() - t0 < 20:
                assert await post() == 201
                await asyncio.sleep(0.2)
            assert rec.seen["normal"] == set(), rec.seen["normal"]

            # The primary fails: standby mode.
            rec.phase = "standby"
            await sandbox.centers["primary"].go_down()
            await rec.until(lambda f: "EdgeAgentOnStandby" in f, "EdgeAgentOnStandby")
            await sandbox.centers["primary"].come_up()
            await rec.until(lambda f: not f, "all resolved")

            # The primary refuses the agent (an expired gateway token): 401 to POST /orders.
            rec.phase = "refusing"
            sandbox.centers["primary"].refuse = 401
            assert await post() == 201  # the standby takes it
            await rec.until(lambda f: "EdgeClusterRefusingAgent" in f, "EdgeClusterRefusingAgent")
            sandbox.centers["primary"].refuse = None

            async def refusal_cleared() -> bool:
                await post()
                return (await status())["clusters"]["primary"]["refusing"] is None

            await wait(refusal_cleared, "the refusal to clear", 30)
            await rec.until(lambda f: not f, "all resolved")

            # Both clusters down, SMS gateway too slow: offline, buffer filling until 507.
            rec.phase = "offline"
            sandbox.sms.delay_s = 2.5
            for name in ("primary", "standby"):
                await sandbox.centers[name].go_down()
            await wait(lambda: _mode(status, "offline"), "offline mode")
            codes = [await post(phone=True) for _ in range(3)]
            # An inbox file the intake refuses for good: rejected/, for ops to review.
            inbox = tmp_path / "spool" / "inbox"
            (inbox / ".junk.part").write_bytes(b"\x00 not json")
            (inbox / ".junk.part").rename(inbox / "junk.json")
            assert codes == [202] * 3
            while await post() != 507:
                pass
            for alert in (
                "EdgeAgentOffline",
                "EdgeAgentOldestPendingHigh",
                "EdgeBufferNearFull",
                "EdgeAgentRefusingOrders",
                "EdgeSmsAmbiguous",
                "EdgeRejectedFiles",
            ):
                await rec.until(lambda f, a=alert: a in rec.seen["offline"], alert)

            # The primary answers again but with a maintenance page (200, no order_id):
            # a cluster takes orders, yet nothing drains.
            rec.phase = "stalled"
            sandbox.sms.delay_s = 0
            sandbox.centers["primary"].page = 200
            await sandbox.centers["primary"].come_up()
            sandbox.centers["primary"].page = 200
            await wait(lambda: _mode(status, "normal"), "normal mode (health 200)")
            await rec.until(lambda f: "EdgeAgentDrainStalled" in f, "EdgeAgentDrainStalled")
            sandbox.centers["primary"].page = None
            await sandbox.centers["standby"].come_up()

            async def drained() -> bool:
                return bool((await status())["pending"] == 0)

            await wait(drained, "the buffer to drain", 60)
            await rec.until(
                lambda f: (
                    not (
                        f
                        & {
                            "EdgeAgentDrainStalled",
                            "EdgeAgentOffline",
                            "EdgeBufferNearFull",
                            "EdgeAgentOldestPendingHigh",
                        }
                    )
                ),
                "buffer alerts resolved",
            )

            # The watchdog kills a wedged agent (SIGABRT, as systemd does) three times.
            rec.phase = "restarts"
            agent.kill(signal.SIGABRT)
            await agent.reap()
            await rec.until(lambda f: "EdgeAgentDown" in f, "EdgeAgentDown")
            agent.start()
            await agent.wait_ready(session)
            await rec.until(lambda f: "EdgeAgentUncleanRestart" in f, "EdgeAgentUncleanRestart")
            for _ in range(2):
                await asyncio.sleep(1.5)  # let a scrape see each process (start time)
                agent.kill(signal.SIGABRT)
                await agent.reap()
                agent.start()
                await agent.wait_ready(session)
            await rec.until(lambda f: "EdgeAgentRestartLoop" in f, "EdgeAgentRestartLoop")
            rec.phase = "end"

            # Each alert fired only where allowed (a phase also allows what lingers from
            # the phase before it, e.g. a stalled drain still has an old, big buffer).
            allowed = {
                "normal": set(),
                "standby": {"EdgeAgentOnStandby"},
                "refusing": {"EdgeClusterRefusingAgent", "EdgeAgentOnStandby"},
                "offline": {
                    "EdgeAgentOffline",
                    "EdgeAgentOldestPendingHigh",
                    "EdgeBufferNearFull",
                    "EdgeAgentRefusingOrders",
                    "EdgeSmsAmbiguous",
                    "EdgeRejectedFiles",
                },
                "stalled": {
                    "EdgeAgentDrainStalled",
                    "EdgeAgentOldestPendingHigh",
                    "EdgeBufferNearFull",
                    "EdgeAgentRefusingOrders",
                    "EdgeSmsAmbiguous",
                    "EdgeAgentOffline",
                    "EdgeRejectedFiles",
                },
                "restarts": {
                    "EdgeAgentDown",
                    "EdgeAgentUncleanRestart",
                    "EdgeAgentRestartLoop",
                    "EdgeSmsAmbiguous",
                    "EdgeAgentRefusingOrders",
                    "EdgeRejectedFiles",
                },
            }
            for phase, fired in rec.seen.items():
                if phase in allowed:
                    assert fired <= allowed[phase], (phase, fired - allowed[phase])
            out = ROOT / "test-artifacts"
            out.mkdir(exist_ok=True)
            (out / "prometheus-alerts.json").write_text(
                json.dumps({phase: sorted(fired) for phase, fired in rec.seen.items()}, indent=2)
            )
            every = set().union(*rec.seen.values())
            assert every == set().union(*allowed.values()), every

            # Every dashboard query evaluates without error against this Prometheus.
            await check_dashboard(prom, session)
        finally:
            await rec.stop()
            agent.kill(signal.SIGKILL)
            await agent.reap()
            prom.stop()


async def _ready(prom: Prom, session: aiohttp.ClientSession) -> bool:
    with contextlib.suppress(aiohttp.ClientError):
        doc = await prom.get(session, "/api/v1/query", {"query": 'up{job="edge-agent"} == 1'})
        return bool(doc["data"]["result"])
    return False


async def _mode(status: Callable[[], Any], mode: str) -> bool:
    return bool((await status())["mode"] == mode)


async def check_dashboard(prom: Prom, session: aiohttp.ClientSession) -> None:
    doc = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):  # a row has none
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace('instance=~"$instance"', 'instance=~".*"')
            )
            assert "$" not in expr.replace("$labels", ""), expr
            answer = await prom.get(session, "/api/v1/query", {"query": expr})
            assert answer["status"] == "success", (panel["title"], expr, answer)
            if not answer["data"]["result"]:
                empty.append(panel["title"])
    # The panels about what just happened have data (an empty answer is no error, but these
    # would mean a wrong metric name).
    for title in (
        "Mode",
        "Agent up",
        "Pending orders",
        "Oldest pending",
        "Buffer use",
        "Orders received by outcome (/s)",
        "SMS outbox by state",
        "Restarts",
        "Clusters up",
        "Files in rejected/",
        "Agent version",
    ):
        assert title not in empty, (title, empty)
    var = next(v for v in doc["templating"]["list"] if v["name"] == "instance")["query"]["query"]
    match = re.fullmatch(r"label_values\((.+), instance\)", var)
    assert match, var
    values = await prom.get(session, "/api/v1/label/instance/values", {"match[]": match.group(1)})
    assert values["status"] == "success" and values["data"], values


def test_rules_copy_keeps_every_alert() -> None:
    original = RULES.read_text()
    text = fast_rules(original)
    assert text.count("- alert:") == original.count("- alert:") > 0
    assert shutil.which("python3")
