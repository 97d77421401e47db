"""`edge-agent drill`: the real command, the real agent subprocess, the loopback sandbox."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from agent.drill.agent_proc import AgentUnderDrill
from agent.drill.load import Load
from agent.drill.runner import SCENARIOS, _verify
from agent.drill.sandbox import Sandbox
from agent.drill.steps import Context
from tests.support.harness import ROOT


def _drill(tmp_path: Path, *scenarios: str, orders: int = 60) -> tuple[int, str, dict]:
    report = tmp_path / "drill.json"
    args = [
        sys.executable,
        "-m",
        "agent",
        "drill",
        "--orders",
        str(orders),
        "--report",
        str(report),
    ]
    for name in scenarios:
        args += ["--scenario", name]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    doc = orjson.loads(report.read_bytes()) if report.exists() else {}
    return done.returncode, done.stdout + done.stderr, doc


def _check(code: int, out: str, doc: dict, names: tuple[str, ...]) -> None:
    assert code == 0, out
    assert doc["passed"] is True
    assert [s["scenario"] for s in doc["scenarios"]] == list(names)
    for s in doc["scenarios"]:
        assert s["lost"] == 0 and s["duplicated"] == 0 and s["sms_twice"] == 0, s
        assert s["acknowledged"] == s["sent"] > 0
        assert "PASS" in out and s["scenario"] in out


def test_quick_drill_subset(tmp_path: Path):
    names = ("primary-outage", "total-outage", "full-chain")
    assert set(names) <= set(SCENARIOS)  # every one is in the default set
    code, out, doc = _drill(tmp_path, *names)
    _check(code, out, doc, names)
    outage = doc["scenarios"][0]
    assert outage["figures"]["failover_s"] < 2.0
    total = doc["scenarios"][1]
    assert total["sms_sent"] == 20  # one per buffered order with a phone (every third)
    # 12 outage orders (a fifth of 60): their tracking re-pushed and verified, the lagging
    # invoices verified late, one finance posting in 10 truncated and reported failed, the
    # one invoice never issued overdue; edge-recover --mode chain agreed.
    chain = doc["scenarios"][2]["figures"]
    assert chain["chain_orders"] == 12 and chain["chain_failed"] == 1
    assert chain["chain_overdue"] == 1 and chain["chain_recover_s"] > 0


@pytest.mark.drill_full
def test_every_scenario(tmp_path: Path):
    names = tuple(SCENARIOS)
    code, out, doc = _drill(tmp_path, *names, orders=200)
    _check(code, out, doc, names)
    print(out)


def test_unknown_scenario_is_a_usage_error(tmp_path: Path):
    code, out, _ = _drill(tmp_path, "no-such-thing")
    assert code == 2 and "unknown scenario" in out


async def test_the_checker_fails_on_loss_duplicates_and_double_sms(tmp_path: Path, http):
    """The verdict comes from the sandbox's records: prove it can say FAIL."""
    sandbox = await Sandbox().start()
    try:
        ctx = Context(sandbox, AgentUnderDrill(tmp_path, sandbox), http, tmp_path, "x", 3)
        load = Load("http://127.0.0.1:1", "x", 3)
        ctx.loads.append(load)
        keys = list(load.orders)
        for n, key in enumerate(keys):
            load.orders[key].status = 202
            load.orders[key].serial = f"S{n}"
        load.sms_queued = {"S0": keys[0]}
        primary, standby = sandbox.centers["primary"], sandbox.centers["standby"]
        primary.take(keys[0], b"{}")
        standby.take(keys[0], b"{}")  # created on both clusters: a duplicate
        primary.take(keys[1], b"{}")  # keys[2] never created: lost
        ok = _verify(ctx, {"sms": {"by_state": {"ambiguous": 0}}})
        assert not ok.passed
        assert ok.lost == [keys[2]] and ok.duplicated == {keys[0]: 2}
        assert ok.sms_missing == 1
    finally:
        await sandbox.stop()
