"""`edge-agent drill`: the real command, the real agent subprocess, the loopback sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from agent.drill.agent_proc import AgentUnderDrill
from agent.drill.load import Load
from agent.drill.replica import NATS_MISSING, SerialsMatch
from agent.drill.runner import SCENARIOS, _verify
from agent.drill.sandbox import Sandbox
from agent.drill.scenarios import NEEDS_NATS
from agent.drill.steps import Context, DrillFailed
from agent.sandbox.nats_cluster import available
from agent.sandbox.servers import SmsReceived
from tests.support.harness import ROOT
from tests.support.nats_cluster import ensure_nats_server


def _drill(
    tmp_path: Path, *scenarios: str, orders: int = 60, env: dict[str, str] | None = None
) -> tuple[int, str, dict]:
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
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    doc = orjson.loads(report.read_bytes()) if report.exists() else {}
    return done.returncode, done.stdout + done.stderr, doc


def _check(code: int, out: str, doc: dict, names: tuple[str, ...]) -> None:
    assert code == 0, out
    assert doc["passed"] is True
    assert [s["scenario"] for s in doc["scenarios"]] == list(names)
    for s in doc["scenarios"]:
        if s["skipped"] is not None:  # only where nats-server is missing, and said so
            assert s["scenario"] in NEEDS_NATS and not available(), s
            assert s["skipped"] == NATS_MISSING and "SKIPPED" in out and NATS_MISSING in out
            continue
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


def test_server_lost_is_skipped_with_its_reason_without_nats_server(tmp_path: Path):
    bare = tmp_path / "bin"  # a PATH with no nats-server on it
    bare.mkdir()
    code, out, doc = _drill(tmp_path, "server-lost", env={**os.environ, "PATH": str(bare)})
    assert code == 0, out
    assert doc["passed"] is True and doc["skipped"] == ["server-lost"]
    (scenario,) = doc["scenarios"]
    assert scenario["skipped"] == NATS_MISSING and scenario["passed"] is False
    assert "SKIPPED" in out and f"server-lost skipped: {NATS_MISSING}" in out
    assert "0 passed, 0 failed, 1 skipped" in out


@pytest.mark.replication
def test_server_lost_scenario_for_real(tmp_path: Path):
    """The drill stage runs before the replication stage installs nats-server: here the
    scenario runs for real, against a three-node cluster the drill starts itself."""
    ensure_nats_server()
    code, out, doc = _drill(tmp_path, "server-lost")
    _check(code, out, doc, ("server-lost",))
    (scenario,) = doc["scenarios"]
    figures = scenario["figures"]
    assert scenario["skipped"] is None
    # every 202'd order was on the lost server, and came back through the takeover alone
    assert figures["lost_buffered"] == figures["taken_over"] == scenario["acknowledged"]
    assert figures["serials_checked"] == scenario["acknowledged"]
    assert scenario["sms_sent"] > 0 and figures["nats_failover_s"] > 0
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


async def test_serials_match_fails_when_an_order_is_created_under_another_serial(
    tmp_path: Path, http
):
    """The server-lost check can say FAIL: a created serial, or an SMS serial, no 202 gave."""
    sandbox = await Sandbox().start()
    try:
        ctx = Context(sandbox, AgentUnderDrill(tmp_path, sandbox), http, tmp_path, "x", 2)
        load = Load("http://127.0.0.1:1", "x", 2)
        ctx.loads.append(load)
        first, second = load.orders.values()
        for n, sent in enumerate((first, second)):
            sent.status, sent.serial = 202, f"S{n}"
        primary = sandbox.centers["primary"]
        primary.take(first.key, b"{}", "S0")
        primary.take(second.key, b"{}", "S1")
        await SerialsMatch().run(ctx)  # as it should be
        primary.serials[second.key] = "S9"  # re-serialed by the takeover
        with pytest.raises(DrillFailed, match="1 orders created under another serial"):
            await SerialsMatch().run(ctx)
        primary.serials[second.key] = "S1"
        sandbox.sms.received.append(SmsReceived("S7", "13800000000", {}, {}, 0.0))
        with pytest.raises(DrillFailed, match="SMS sent for serials no 202 gave"):
            await SerialsMatch().run(ctx)
    finally:
        await sandbox.stop()
