"""The chain ledger's counts kept in memory (issue 20.5) and its pruning (issue 20.4).

A real SQLite ledger on disk. The counts /status shows must equal what a GROUP BY over
the ledger says, after a mix of transitions, a restart and a prune, without /status ever
reading the ledger; finished rows are forgotten after retention, unfinished ones never.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.chain.ledger import FAILED, OVERDUE, PENDING, STATES, VERIFIED, Ledger
from agent.chain.steps import ChainOrder
from agent.errors import PersistError
from tests.integration.test_chain import all_in, chain, order_id_of, outage
from tests.support.chain_fakes import Downstream, chain_section
from tests.support.fakes import FakeCenter
from tests.support.harness import AgentFactory, order, wait_for

STEPS = ("logistics", "invoice", "finance")
DEADLINE_S = 3600.0


def _order(n: int) -> ChainOrder:
    return ChainOrder(f"S-{n:06d}", f"OC-{n}", f"dy:{n}", "dy", str(n), "2026-12-03T10:00:00", "{}")


async def _counted(ledger: Ledger, deadline_s: float) -> dict[str, dict[str, int]]:
    """The oracle: a GROUP BY over the ledger, as /status used to run per request."""
    rows = await ledger._db.read(
        "SELECT step, CASE WHEN state=? AND delivered_at + ? < ? THEN ? ELSE state END, "
        "COUNT(*) FROM steps GROUP BY 1, 2",
        (PENDING, deadline_s, time.time(), OVERDUE),
    )
    out = {step: dict.fromkeys(STATES, 0) for step in ledger.steps}
    for step, state, n in rows:
        out[step][state] = n
    return out


async def test_counts_follow_every_transition_and_a_restart_without_reading_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "chain.sqlite3"
    ledger = Ledger(path, STEPS)
    await ledger.start()
    now = time.time()
    # 60 orders delivered now, 20 delivered two hours ago (their pending steps: overdue)
    for n in range(80):
        await ledger.enrol(_order(n), now if n < 60 else now - 7200, "drain")
    await ledger.enrol(_order(3), now, "merged")  # enrolled again: keeps its place, no count
    transitions = [
        (n, step, state)
        for n in range(80)
        for step, state in zip(STEPS, (VERIFIED, FAILED, VERIFIED), strict=True)
        if n % 3 == STEPS.index(step) or n % 7 == 0
    ]
    for n, step, state in transitions:
        await ledger.record(f"S-{n:06d}", step, state, "", now, None)
    # back again: failed -> verified, verified -> pending (a state moves more than once)
    await ledger.record("S-000001", "invoice", VERIFIED, "", now, None)
    await ledger.record("S-000000", "logistics", PENDING, "", now, None)
    await ledger.record("S-999999", "logistics", VERIFIED, "", now, None)  # no such row

    async def no_reads(*args: Any, **kwargs: Any) -> Any:
        raise PersistError("/status must not read the ledger")

    with monkeypatch.context() as m:
        m.setattr(ledger._db, "read", no_reads)
        m.setattr(ledger._db, "read_inline", no_reads)
        cached = ledger.counts(DEADLINE_S)
    assert cached == await _counted(ledger, DEADLINE_S)
    assert cached["logistics"][OVERDUE] > 0 and cached["invoice"][FAILED] > 0
    assert sum(cached["finance"].values()) == 80

    await ledger.stop()
    again = Ledger(path, (*STEPS, "customs"))  # a step added to the config meanwhile
    await again.start()
    try:
        counts = again.counts(DEADLINE_S)
        assert counts == await _counted(again, DEADLINE_S)
        assert {k: counts[k] for k in STEPS} == cached
        assert counts["customs"][PENDING] == 60 and counts["customs"][OVERDUE] == 20
    finally:
        await again.stop()


async def test_prune_forgets_finished_old_orders_only_and_moves_the_counts(tmp_path: Path):
    ledger = Ledger(tmp_path / "chain.sqlite3", STEPS)
    await ledger.start()
    try:
        old, now = time.time() - 10 * 86400, time.time()
        for n in range(6):
            await ledger.enrol(_order(n), old if n < 5 else now, "drain")
        for n in range(6):
            for step in STEPS:
                state = FAILED if (n, step) == (1, "finance") else VERIFIED
                if (n, step) != (2, "invoice"):  # order 2: its invoice still pending
                    await ledger.record(f"S-{n:06d}", step, state, "", now, None)

        async def keep(serials: list[str]) -> set[str]:
            return {"S-000003"}  # its merged/ copy is still there

        gone = await ledger.prune(time.time() - 86400, keep)
        # 0 verified, 1 failed and reported, 4 verified: finished and old; 2 unfinished;
        # 3 kept by the caller; 5 too young.
        assert sorted(gone) == ["S-000000", "S-000001", "S-000004"]
        assert await ledger.serials() == {"S-000002", "S-000003", "S-000005"}
        assert ledger.counts(DEADLINE_S) == await _counted(ledger, DEADLINE_S)
    finally:
        await ledger.stop()


async def test_finished_orders_are_forgotten_after_retention_and_never_enrolled_again(
    make_agent: AgentFactory, center: FakeCenter, tmp_path: Path
):
    downstream = await Downstream(center=center).start()
    try:
        agent = await make_agent(
            center.url, buffer={"retention_days": 0.0}, chain=chain_section(downstream)
        )
        verifier = agent.service.chain
        assert verifier is not None
        serials = await outage(agent, center, [order(n, total_amount="4") for n in (1, 2, 3)])
        done, unfinished = [serials[0], serials[2]], serials[1]
        for n in (1, 3):
            downstream.invoice_ready.add(order_id_of(center, n))
        for step in ("invoice", "logistics", "finance"):
            await wait_for(lambda s=step: all_in(agent, done, s, VERIFIED), what=step)
        await wait_for(lambda: all_in(agent, [unfinished], "finance", VERIFIED), what="finance")
        merged = agent.spool / "merged"
        for serial in serials[:2]:  # past retention (0 days) from now on
            os.utime(merged / f"{serial}.json", (1, 1))
        # Order 3's copy is not expired yet (a clock step, a copy touched by a restore):
        # the ledger must keep its rows, or the merged/ scan would enrol it again.
        later = time.time() + 3600
        os.utime(merged / f"{serials[2]}.json", (later, later))
        await agent.service.housekeeper.run_once()
        # Order 1 is finished: its copy expired, then its ledger rows were forgotten.
        # Order 2's invoice is pending: its copy and its rows stay.
        assert agent.files("merged") == sorted(f"{s}.json" for s in serials[1:])
        assert await verifier.ledger.serials() == set(serials[1:])
        assert await chain(agent, serials[0]) is None
        counts = await verifier.counts()
        assert counts["invoice"][PENDING] == 1 and sum(counts["invoice"].values()) == 2
        assert await verifier.scan_merged() == 0  # nothing to enrol again
        await agent.service.housekeeper.run_once()  # and again: nothing changes
        assert await verifier.ledger.serials() == set(serials[1:])
    finally:
        await downstream.stop()


async def test_an_order_id_lost_to_a_power_cut_is_asked_of_the_center(
    make_agent: AgentFactory, center: FakeCenter
):
    """Found by the LazyFS cut during verification: a merged/ copy whose order_id write
    was lost (and the journal's too) was enrolled without it, and every step was failed
    for good ("cannot build the check"). The center knows the order by its key."""
    from tests.support.recover_helpers import body, record

    downstream = await Downstream(center=center).start()
    try:
        agent = await make_agent(center.url, chain=chain_section(downstream))
        text = body(7, total_amount="12.30")
        rec = record(7, 7, node="wh-test-01", text=text)
        center.take(rec.dedupe_key, text.encode())  # delivered: the center holds it
        downstream.repushed.add(order_id_of(center, 7))
        downstream.invoice_all = True
        (agent.spool / "merged").mkdir(exist_ok=True)
        (agent.spool / "merged" / rec.filename).write_bytes(rec.to_bytes())  # no order_id
        verifier = agent.service.chain
        assert verifier is not None
        assert await verifier.scan_merged() == 1
        await wait_for(lambda: _all_verified(verifier, rec.serial), what="verified by key")

    finally:
        await downstream.stop()


async def _all_verified(verifier: Any, serial: str) -> bool:
    steps = await verifier.ledger.chain_of(serial, DEADLINE_S)
    return {k: v["state"] for k, v in steps.items()} == dict.fromkeys(STEPS, VERIFIED)
