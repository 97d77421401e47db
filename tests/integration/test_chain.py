"""Full-chain verification (CONTRACT 10) against real loopback servers.

An order center (FakeCenter on 127.0.0.2) and a TMS / invoicing / ERP trio
(tests/support/chain_fakes.py on 127.0.0.5); the agent in-process with real files.
Each test makes a real outage: the center answers 503, orders are buffered
(202), the center comes back, the drain delivers them, and the verifier takes
it from there. Moments are awaited by polling, never by sleeping.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.chain.ledger import FAILED, OVERDUE, PENDING, VERIFIED, Due
from tests.support.chain_fakes import Downstream, RawNumber, chain_section
from tests.support.fakes import FakeCenter
from tests.support.harness import AgentFactory, AgentHandle, order, wait_for


@pytest.fixture
async def downstream(center: FakeCenter) -> AsyncIterator[Downstream]:
    ds = await Downstream(center=center).start()
    yield ds
    await ds.stop()


async def outage(
    agent: AgentHandle, center: FakeCenter, bodies: list[bytes | dict[str, Any]]
) -> list[str]:
    """Buffer ``bodies`` while the center is down, bring it back, wait for the drain."""
    center.mode = "503"
    await wait_for(lambda: agent.service.mode() == "offline", what="offline")
    serials = []
    for body in bodies:
        status, doc = await agent.post(body)
        assert status == 202, doc
        serials.append(doc["serial"])
    center.mode = "up"
    await wait_for(
        lambda: len(agent.files("merged")) == len(bodies),
        timeout=20,
        what="every buffered order delivered",
    )
    return serials


def order_id_of(center: FakeCenter, n: int | str) -> str:
    return center.orders[f"douyin:{n}"][0]


async def chain(agent: AgentHandle, serial: str) -> dict[str, str] | None:
    status, doc = await agent.get(f"/v1/orders/{serial}")
    assert status == 200, doc
    result: dict[str, str] | None = doc["chain"]
    return result


async def all_in(agent: AgentHandle, serials: list[str], step: str, state: str) -> bool:
    for serial in serials:
        steps = await chain(agent, serial)
        if steps is None or steps.get(step) != state:
            return False
    return True


async def test_repair_lag_and_truncated_amount_end_as_they_should(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    agent = await make_agent(center.url, chain=chain_section(downstream))
    bodies: list[bytes | dict[str, Any]] = [
        order(1, total_amount="199.10"),
        order(2, total_amount="199.10"),  # the ERP posts it truncated
        b'{"channel_id": "douyin", "channel_order_id": "3", "total_amount": 199.10}',
    ]
    downstream.amount_override["2"] = "199"
    downstream.amount_override["3"] = RawNumber("199.1")  # the same amount, other digits
    serials = await outage(agent, center, bodies)
    oid = {n: order_id_of(center, n) for n in (1, 2, 3)}

    # Tracking appears only after the re-push: the verifier asks it, then sees it.
    await wait_for(
        lambda: all_in(agent, serials, "logistics", VERIFIED),
        timeout=15,
        what="logistics verified after the re-push",
    )
    assert {downstream.repush_calls[oid[n]] for n in (1, 2, 3)} == {1}
    # The truncated amount is failed, with both values; the others are verified.
    await wait_for(lambda: all_in(agent, serials[2:], "finance", VERIFIED), what="finance")
    await wait_for(lambda: all_in(agent, serials[1:2], "finance", FAILED), what="failed")
    steps = await agent.service.chain.ledger.chain_of(serials[1], 3600)  # type: ignore[union-attr]
    assert steps["finance"]["detail"] == '/amount is "199" downstream, expected "199.10"'
    assert (await chain(agent, serials[0]))["finance"] == VERIFIED  # type: ignore[index]
    # The invoice lags: pending (404) until it is issued, then verified.
    assert (await chain(agent, serials[0]))["invoice"] == PENDING  # type: ignore[index]
    downstream.invoice_all = True
    await wait_for(lambda: all_in(agent, serials, "invoice", VERIFIED), what="invoices")
    # Someone corrects the posting: the failed step turns verified at a recheck.
    del downstream.amount_override["2"]
    await wait_for(lambda: all_in(agent, serials, "finance", VERIFIED), what="corrected")
    # Every step verified: nothing is due any more (a verified step is never checked or
    # repaired again), and each tracking was re-pushed exactly once.
    assert await agent.service.chain.ledger.next_check() is None  # type: ignore[union-attr]
    assert {downstream.repush_calls[oid[n]] for n in (1, 2, 3)} == {1}

    status, doc = await agent.get("/status")
    assert doc["chain"] == {
        step: {VERIFIED: 3, PENDING: 0, FAILED: 0, OVERDUE: 0}
        for step in ("logistics", "invoice", "finance")
    }
    status, text = await agent.get("/metrics")
    assert 'edge_chain_steps{state="verified",step="finance"} 3.0' in text
    assert 'edge_chain_steps{state="failed",step="finance"} 0.0' in text
    # A forwarded order (not an outage order) carries chain: null.
    status, doc = await agent.post(order(9, total_amount="1.00"))
    assert status == 201 and doc["cluster"] == "primary"
    assert await chain(agent, doc["serial"]) is None


async def test_repair_only_for_a_pending_step_and_not_again_within_the_interval(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    """The rule itself, one check at a time (jitter makes the loop's timing random)."""
    agent = await make_agent(center.url, chain=chain_section(downstream, recheck_interval_s=30))
    downstream.repush_works = False  # the TMS takes re-pushes but shows no tracking
    serials = await outage(agent, center, [order(1, total_amount="5")])
    oid = order_id_of(center, 1)
    verifier = agent.service.chain
    assert verifier is not None
    await wait_for(lambda: downstream.repush_calls[oid] >= 1, what="the first repair")
    assert downstream.repush_calls[oid] == 1, (  # a stale read of the ledger asked it twice
        downstream.repush_calls[oid],
        await verifier.ledger.chain_of(serials[0], 3600),
    )
    facts = (await verifier.ledger.due(time.time() + 60, 10))[0].order
    assert facts.serial == serials[0]
    await verifier.check_one(Due(facts, "logistics", PENDING, last_repair=time.time() - 29))
    assert downstream.repush_calls[oid] == 1  # asked 29 s ago: not again
    await verifier.check_one(Due(facts, "logistics", PENDING, last_repair=time.time() - 31))
    assert downstream.repush_calls[oid] == 2  # a full interval since: asked again
    downstream.repushed.add(oid)  # the tracking shows now: verified, no repair
    await verifier.check_one(Due(facts, "logistics", PENDING, last_repair=None))
    assert downstream.repush_calls[oid] == 2
    assert (await chain(agent, serials[0]))["logistics"] == VERIFIED


async def test_each_step_is_checked_once_per_interval_under_load(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    """A check that ends while the loop reads the ledger is not taken again from that read
    (it was: the step was checked, and its repair asked, twice in a row)."""
    agent = await make_agent(
        center.url, chain=chain_section(downstream, recheck_interval_s=30, concurrency=4)
    )
    downstream.repush_works = False
    n = 40
    serials = await outage(agent, center, [order(i, total_amount="5") for i in range(n)])
    verifier = agent.service.chain
    assert verifier is not None

    async def all_checked() -> bool:
        for serial in serials:
            steps = await verifier.ledger.chain_of(serial, 3600)
            if len(steps) < 3 or any(v["detail"] is None for v in steps.values()):
                return False  # not enrolled yet, or a step not checked yet
        return not verifier.in_flight

    await wait_for(all_checked, timeout=30, what="every step of every order checked")
    oids = [order_id_of(center, i) for i in range(n)]
    odd = {o: downstream.repush_calls[o] for o in oids if downstream.repush_calls[o] != 1}
    assert not odd, [
        (odd, await verifier.ledger.chain_of(serials[oids.index(o)], 3600)) for o in odd
    ]
    assert len(downstream.seen_auth) == n * 3 + n  # three checks and one repair each


async def test_overdue_past_a_fractional_deadline(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    # 0.0005 h = 1.8 s from delivery.
    agent = await make_agent(center.url, chain=chain_section(downstream, deadline_h=0.0005))
    serials = await outage(
        agent, center, [order(1, total_amount="9.90"), order(2, total_amount="9.90")]
    )
    await wait_for(lambda: all_in(agent, serials, "finance", VERIFIED), what="finance")
    await wait_for(
        lambda: all_in(agent, serials, "invoice", OVERDUE),
        timeout=15,
        what="the lagging invoice overdue",
    )
    # /status counts pending steps per second of delivery: overdue there at most 1 s later.
    doc = await wait_for(lambda: _status_if(agent, "invoice", OVERDUE, 2), what="/status")
    assert doc["chain"]["invoice"] == {VERIFIED: 0, PENDING: 0, FAILED: 0, OVERDUE: 2}
    assert doc["chain"]["finance"][OVERDUE] == 0  # verified steps are never overdue
    # Late is still verified: overdue is a view of pending, not an end.
    downstream.invoice_all = True
    await wait_for(lambda: all_in(agent, serials, "invoice", VERIFIED), what="verified late")


async def _status_if(agent: AgentHandle, step: str, state: str, n: int) -> Any:
    _, doc = await agent.get("/status")
    return doc if doc["chain"][step][state] == n else None


async def test_503_and_refused_connections_are_retried_never_failed(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    steps = chain_section(downstream)["step"]
    dead = "http://127.0.0.6:9"  # nothing listens: connection refused
    steps[1] = {
        "name": "invoice",
        "check": f"GET {dead}/inv?order_no={{order_id}}",
        "present": "/items/0",
    }
    downstream.erp_status = 503
    agent = await make_agent(center.url, chain=chain_section(downstream, step=steps))
    serials = await outage(agent, center, [order(1, total_amount="3.30")])
    verifier = agent.service.chain
    assert verifier is not None
    checks = verifier.checks
    await wait_for(lambda: verifier.checks >= checks + 12, timeout=20, what="many checks")
    steps_now = await verifier.ledger.chain_of(serials[0], 3600)
    assert steps_now["finance"]["state"] == PENDING
    assert "retrying" in steps_now["finance"]["detail"] and "503" in steps_now["finance"]["detail"]
    assert steps_now["invoice"]["state"] == PENDING
    assert "retrying" in steps_now["invoice"]["detail"]
    _, doc = await agent.get("/status")
    assert doc["chain"]["finance"][FAILED] == 0 and doc["chain"]["invoice"][FAILED] == 0
    downstream.erp_status = None  # the ERP is back
    await wait_for(lambda: all_in(agent, serials, "finance", VERIFIED), what="finance back")


async def test_other_4xx_is_failed_and_404_is_not_yet(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    downstream.erp_status = 403
    agent = await make_agent(center.url, chain=chain_section(downstream))
    serials = await outage(agent, center, [order(1, total_amount="3.30")])
    await wait_for(lambda: all_in(agent, serials, "finance", FAILED), what="403 failed")
    await wait_for(lambda: all_in(agent, serials, "invoice", PENDING), what="404 pending")
    detail = (
        await agent.service.chain.ledger.chain_of(  # type: ignore[union-attr]
            serials[0], 3600
        )
    )["finance"]["detail"]
    assert "HTTP 403" in detail and "maintenance" in detail


async def test_standby_orders_are_outage_orders_and_rebuilt_from_the_journal(
    make_agent: AgentFactory,
    center: FakeCenter,
    standby: FakeCenter,
    downstream: Downstream,
    tmp_path: Path,
):
    downstream.invoice_all = True
    agent = await make_agent(
        center.url, upstream={"standby": standby.url}, chain=chain_section(downstream)
    )
    await center.go_down()
    await wait_for(lambda: agent.service.mode() == "standby", what="standby mode")
    status, doc = await agent.post(order(1, total_amount="42"))
    assert (status, doc["cluster"]) == (201, "standby")
    downstream.center = standby  # the ERP of this test reads the standby's orders
    for step in ("logistics", "invoice", "finance"):
        await wait_for(
            lambda step=step: all_in(agent, [doc["serial"]], step, VERIFIED),
            what=f"the standby's order verified: {step}",
        )
    _, by_key = await agent.get("/v1/orders/by-key/douyin:1")
    assert by_key["chain"] == {"logistics": VERIFIED, "invoice": VERIFIED, "finance": VERIFIED}
    # A damaged ledger: the standby's order is in no merged/ file, the journal has it.
    await agent.service.stop()
    ledger = tmp_path / "state" / "chain.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    ledger.write_bytes(b"garbage" * 1000)
    again = await make_agent(
        center.url, upstream={"standby": standby.url}, chain=chain_section(downstream)
    )
    await wait_for(
        lambda: all_in(again, [doc["serial"]], "logistics", VERIFIED),
        what="the standby's order back in the ledger",
    )
    # The journal keeps no order body: a step that needs one says so (reported failed).
    await wait_for(lambda: all_in(again, [doc["serial"]], "finance", FAILED), what="finance")
    steps = await again.service.chain.ledger.chain_of(doc["serial"], 3600)  # type: ignore[union-attr]
    assert steps["finance"]["detail"] == (
        "cannot build the expected value: the order body is not known"
    )


async def test_merged_files_from_edge_recover_are_enrolled_by_the_scan(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    agent = await make_agent(center.url, chain=chain_section(downstream))
    serials = await outage(agent, center, [order(1, total_amount="1.10")])
    # edge-recover beside the agent merged another directory's order into merged/.
    doc = orjson.loads((agent.spool / "merged" / f"{serials[0]}.json").read_bytes())
    doc.update(
        serial="wh-other-01-000000000042",
        dedupe_key="douyin:77",
        body='{"channel_id":"douyin","channel_order_id":"77","total_amount":"1.10"}',
        order_id="OC77",
    )
    (agent.spool / "merged" / "wh-other-01-000000000042.json").write_bytes(orjson.dumps(doc))
    verifier = agent.service.chain
    assert verifier is not None
    steps = await wait_for(
        lambda: verifier.ledger.chain_of("wh-other-01-000000000042", 3600),
        timeout=10,
        what="the scan enrols it",
    )
    assert set(steps) == {"logistics", "invoice", "finance"}
    _, status = await agent.get("/status")
    assert sum(status["chain"]["finance"].values()) == 2


async def test_a_damaged_ledger_is_moved_aside_and_rebuilt_from_merged(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream, tmp_path: Path
):
    agent = await make_agent(center.url, chain=chain_section(downstream))
    serials = await outage(agent, center, [order(n, total_amount="7.00") for n in range(5)])
    await wait_for(lambda: all_in(agent, serials, "finance", VERIFIED), what="verified")
    await agent.service.stop()
    ledger = tmp_path / "state" / "chain.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    ledger.write_bytes(b"this is not a database" * 100)
    again = await make_agent(center.url, chain=chain_section(downstream))
    assert again.service.chain is not None and again.service.chain.ledger.fresh
    assert list((tmp_path / "state").glob("chain.sqlite3.damaged-*"))
    await wait_for(lambda: all_in(again, serials, "finance", VERIFIED), what="rebuilt")


async def test_step_tokens_are_sent_and_never_logged(
    make_agent: AgentFactory,
    center: FakeCenter,
    downstream: Downstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    token = tmp_path / "tms-token"
    token.write_text("s3cret-tms-token\n")
    steps = chain_section(downstream)["step"]
    steps[0]["token_file"] = str(token)
    agent = await make_agent(center.url, chain=chain_section(downstream, step=steps))
    caplog.set_level("DEBUG")
    serials = await outage(agent, center, [order(1, total_amount="2")])
    await wait_for(lambda: all_in(agent, serials, "logistics", VERIFIED), what="verified")
    assert "Bearer s3cret-tms-token" in downstream.seen_auth
    assert "s3cret" not in caplog.text
    assert not re.search("s3cret", repr(agent.cfg))


async def test_intake_is_not_slowed_by_a_downstream_that_hangs(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    downstream.hang = True
    agent = await make_agent(
        center.url, chain=chain_section(downstream, timeout_s=60, concurrency=4)
    )
    verifier = agent.service.chain
    assert verifier is not None
    await outage(agent, center, [order(n, total_amount="1") for n in range(8)])
    await wait_for(
        lambda: len(verifier.in_flight) == 4 and downstream.hanging == 4,
        what="every check slot held by a hanging downstream",
    )
    # Orders keep getting their answers: 201 while the center is up...
    for n in range(100, 120):
        status, doc = await agent.post(order(n, total_amount="1"))
        assert status == 201, doc
    # ...and 202 while it is down (these are enrolled behind the reply, later).
    center.mode = "503"
    await wait_for(lambda: agent.service.mode() == "offline", what="offline")
    for n in range(200, 220):
        status, doc = await agent.post(order(n, total_amount="1"))
        assert status == 202, doc
    # The whole time, the verifier's checks were in flight and still are.
    assert len(verifier.in_flight) == 4 and downstream.hanging == 4
    assert verifier.checks == 0


async def test_a_step_class_by_module_and_by_entry_point(
    make_agent: AgentFactory,
    center: FakeCenter,
    downstream: Downstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    dist = tmp_path / "site" / "example_wms-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: example-wms\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[order_edge_agent.chain_steps]\nexample-wms = tests.support.chain_plugin:ExampleStep\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    steps = [
        {"name": "wms", "kind": "tests.support.chain_plugin:ExampleStep"},
        {"name": "wms2", "kind": "example-wms"},
    ]
    agent = await make_agent(center.url, chain=chain_section(downstream, step=steps))
    serials = await outage(
        agent, center, [order(1, wms_code="SH-7"), order(2), order("sdk-down", wms_code="SH-8")]
    )
    for step in ("wms", "wms2"):
        await wait_for(
            lambda step=step: all_in(agent, serials[:1], step, VERIFIED), what=f"{step} verified"
        )
        await wait_for(
            lambda step=step: all_in(agent, serials[1:2], step, FAILED), what=f"{step} failed"
        )
    verifier = agent.service.chain
    assert verifier is not None
    down = await wait_for(
        lambda: _detail_has(verifier, serials[2], "wms", "retrying"),
        what="an SDK exception retried",
    )
    assert down["state"] == PENDING and "connection reset" in down["detail"]


async def _detail_has(verifier: Any, serial: str, step: str, text: str) -> Any:
    steps = await verifier.ledger.chain_of(serial, 3600)
    return steps[step] if step in steps and text in steps[step]["detail"] else None


@pytest.mark.parametrize(
    "kind",
    [
        "tests.support.chain_plugin:NotAStep",
        "tests.support.chain_plugin:Nope",
        "no_such_module:Step",
        "no-such-entry-point",
    ],
)
def test_a_bad_step_class_stops_the_start_with_a_config_error(tmp_path: Path, kind: str):
    from agent.config import load_config
    from agent.errors import ConfigError
    from agent.service.service import Service
    from tests.support.harness import write_config

    path = write_config(
        tmp_path,
        "http://127.0.0.2:1/v3",
        chain={"enabled": True, "step": [{"name": "wms", "kind": kind}]},
    )
    with pytest.raises(ConfigError, match="chain step wms: "):
        Service(load_config(str(path)))


async def test_merged_retention_keeps_files_whose_chain_is_unfinished(
    make_agent: AgentFactory, center: FakeCenter, downstream: Downstream
):
    import os

    agent = await make_agent(
        center.url, buffer={"retention_days": 0.0}, chain=chain_section(downstream)
    )
    serials = await outage(agent, center, [order(1, total_amount="4"), order(2, total_amount="4")])
    downstream.invoice_ready.add(order_id_of(center, 1))
    await wait_for(lambda: all_in(agent, serials[:1], "invoice", VERIFIED), what="invoice 1")
    await wait_for(lambda: all_in(agent, serials[:1], "logistics", VERIFIED), what="tracking")
    await wait_for(lambda: all_in(agent, serials[:1], "finance", VERIFIED), what="finance")
    for name in agent.files("merged"):  # past retention (0 days) from now on
        os.utime(agent.spool / "merged" / name, (1, 1))
    await agent.service.housekeeper.run_once()
    # Order 1's chain is finished: its copy may go. Order 2's invoice is pending: it stays.
    assert agent.files("merged") == [f"{serials[1]}.json"]


async def test_a_failing_ledger_never_fails_intake_and_the_scan_catches_up(
    make_agent: AgentFactory,
    center: FakeCenter,
    downstream: Downstream,
    monkeypatch: pytest.MonkeyPatch,
):
    from agent.errors import PersistError

    agent = await make_agent(center.url, chain=chain_section(downstream))
    verifier = agent.service.chain
    assert verifier is not None
    db = verifier.ledger._db  # the fault: every ledger write fails (a disk error)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise PersistError("chain ledger write failed: disk I/O error")

    monkeypatch.setattr(db, "in_transaction", broken)
    serials = await outage(agent, center, [order(n, total_amount="6.60") for n in range(4)])
    status, doc = await agent.post(order(99, total_amount="1"))  # and a forwarded one
    assert status == 201, doc
    for serial in serials:
        assert await chain(agent, serial) is None  # nothing stored, every order answered
    monkeypatch.undo()  # the disk is fine again: the merged/ scan enrols them
    await wait_for(
        lambda: all_in(agent, serials, "invoice", PENDING), timeout=15, what="the scan catches up"
    )
