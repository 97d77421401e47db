"""One check of one step of one order, and what it does to the step (CONTRACT 10).

Shared by the agent's verifier and ``edge-recover --mode chain``: one place decides
what an answer means. Verified; pending (not yet: the ``repair`` is asked, at most
once per recheck interval); failed (a mismatch, or a 4xx other than 404/408/429:
reported with both values, rechecked, verified once corrected downstream); retry
(5xx, timeout, refused: the state stays as it was, never failed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.chain.ledger import Due, Ledger
from agent.chain.states import FAILED, PENDING, VERIFIED
from agent.chain.steps import Outcome, StepCheck
from agent.delivery.pacing import jittered

log = logging.getLogger("agent.chain")
_STATE = {Outcome.VERIFIED: VERIFIED, Outcome.PENDING: PENDING, Outcome.FAILED: FAILED}


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    state: str  # as stored after this check (a retry keeps the state it had)
    detail: str
    last_repair: float | None


async def judge(step: StepCheck, item: Due, interval_s: float) -> Verdict:
    """Check the step; ask its repair if it is still missing and none was asked lately."""
    result = await step.check(item.order)
    now = time.time()
    state = _STATE.get(result.outcome, item.state)
    detail = result.detail
    if result.outcome is Outcome.RETRY:
        detail = f"retrying: {result.detail}"
    last_repair = item.last_repair
    if (
        result.outcome is Outcome.PENDING
        and step.can_repair
        and (last_repair is None or now - last_repair >= interval_s)
    ):
        await step.repair(item.order)
        last_repair = time.time()
        detail = f"{detail}; repair asked"
    return Verdict(result.outcome, state, detail, last_repair)


async def settle(ledger: Ledger, item: Due, verdict: Verdict, interval_s: float) -> None:
    """Log a change of state and store the verdict; the next check in about ``interval_s``."""
    if verdict.state != item.state:
        level = logging.WARNING if verdict.state == FAILED else logging.INFO
        log.log(
            level,
            "chain: %s %s %s -> %s: %s",
            item.order.serial,
            item.step,
            item.state,
            verdict.state,
            verdict.detail,
            extra={"serial": item.order.serial, "step": item.step, "state": verdict.state},
        )
    await ledger.record(
        item.order.serial,
        item.step,
        verdict.state,
        verdict.detail,
        time.time() + jittered(interval_s),
        verdict.last_repair,
    )
