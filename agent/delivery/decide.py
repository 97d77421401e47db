"""What one attempt's result means, and what its caller does next (CONTRACT 5 and 7).

Three callers send an order to a target and get back an ``Answer`` or an
``UpstreamError``: the forward path (a new order, inside its client's request),
the agent's drain (a buffered order) and ``edge-recover`` (a buffer directory).
Each of them asks ``decide()`` and does what the ``Action`` says; none of them
reads a status code itself. The table in ``tests/unit/test_decide.py`` is the
specification: every status and failure phase of CONTRACT 7, for each caller.

The rule that keeps "never created twice": an attempt that may have created the
order (sent, and no clear answer) *pins* the order to its target; only an attempt
that clearly created nothing (refused before sending, 408/425/429/503, the target
refusing the agent) lets the order go anywhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.errors import UpstreamAmbiguous, UpstreamError
from agent.upstream.answers import SLOW_DOWN_STATUSES, Answer, Outcome

# edge-recover gives an order up for this run (it stays pending, rerun to continue) after
MAX_TRANSIENT = 8  # unclear answers or failed connections: ~1 minute of backoff in all
MAX_BUSY = 30  # clear "not now" answers (408/425/429/503), each after Retry-After
BUSY_WAIT_S = 1.0  # the wait after a "not now" that names no Retry-After


class Caller(enum.Enum):
    FORWARD = "forward"  # a new order: another cluster may be tried at once, else buffer
    DRAIN = "drain"  # the agent's drain: the order stays pending and is retried later
    RECOVER = "recover"  # edge-recover: retried a bounded number of times in this run


class Step(enum.Enum):
    MERGE = "merge"  # delivered: merged/ with the center's order_id (forward: 201)
    QUARANTINE = "quarantine"  # the order itself is refused for good: rejected/ with a reason
    NEXT = "next"  # forward: nothing was created there; try the next cluster now
    BUFFER = "buffer"  # forward: keep it on disk (pinned when ``pin``)
    RETRY = "retry"  # drain, recover: it stays pending and is sent again later
    GIVE_UP = "give_up"  # recover: it stays pending; this run stops trying it


class Kind(enum.Enum):
    """Which retry budget an attempt spends (edge-recover counts them separately)."""

    NONE = "none"
    TRANSIENT = "transient"  # 5xx, unclear answers, failed connections
    BUSY = "busy"  # a clear "not now": 408, 425, 429, 503


@dataclass(frozen=True)
class Attempts:
    """What earlier attempts of one order spent (edge-recover's bounded retries)."""

    transient: int = 0
    busy: int = 0

    def after(self, action: Action) -> Attempts:
        if action.kind is Kind.TRANSIENT:
            return Attempts(self.transient + 1, self.busy)
        if action.kind is Kind.BUSY:
            return Attempts(self.transient, self.busy + 1)
        return self


@dataclass(frozen=True)
class Action:
    step: Step
    outcome: str  # label for metrics and reports (an Outcome value, or a failure)
    reason: str = ""
    pin: bool = False  # the target may hold the order now: pin it there first
    hold: bool = False  # the target is failing or refusing: stop sending to it, back off
    refusing: bool = False  # the target refuses the agent (401/403/404/405/407)
    slow_down: bool = False  # 429/503: pace down (honouring ``wait_s``)
    wait_s: float = 0.0  # the least time before this order is sent again
    kind: Kind = Kind.NONE

    @property
    def settles(self) -> bool:
        return self.step in (Step.MERGE, Step.QUARANTINE)

    @property
    def created_nothing(self) -> bool:
        """The target clearly did not create the order: a note that it might is void."""
        return not self.pin and not self.settles


# The answer to every delivered order (a merge settles 100,000 of them): built once.
_DELIVERED = {o: Action(Step.MERGE, o.value) for o in Outcome if o.delivered}


def decide(
    result: Answer | UpstreamError, caller: Caller, target: str, attempts: Attempts = Attempts()
) -> Action:
    """The one answer-to-action table. ``target``: a cluster name or URL, for the reason."""
    if isinstance(result, UpstreamError):
        return _failed(result, caller, target, attempts)
    outcome = result.outcome
    if outcome.delivered:
        return _DELIVERED[outcome]
    said = f"HTTP {result.status}" + (f": {result.error}" if result.error else "")
    if outcome.permanent:
        return Action(Step.QUARANTINE, outcome.value, f"{target} answered {said}")
    if outcome is Outcome.REFUSED:
        reason = (
            f"{target} refuses the agent ({said}): check its credentials, route and "
            "proxy; the order is kept"
        )
        later = Step.GIVE_UP if caller is Caller.RECOVER else Step.RETRY
        return Action(
            Step.NEXT if caller is Caller.FORWARD else later,
            outcome.value,
            reason,
            hold=True,
            refusing=True,
        )
    if outcome is Outcome.RETRY:  # 408/425/429/503: clearly not taken
        slow = result.status in SLOW_DOWN_STATUSES
        wait = result.retry_after_s if result.retry_after_s is not None else BUSY_WAIT_S
        reason = f"{target} answered {said}"
        if caller is Caller.FORWARD:
            return Action(Step.NEXT, outcome.value, reason, slow_down=slow)
        if caller is Caller.RECOVER and attempts.busy + 1 >= MAX_BUSY:
            return Action(
                Step.GIVE_UP,
                outcome.value,
                f"{target} kept answering {said}",
                slow_down=slow,
                kind=Kind.BUSY,
            )
        return Action(
            Step.RETRY,
            outcome.value,
            reason,
            hold=result.status == 503,
            slow_down=slow,
            wait_s=wait,
            kind=Kind.BUSY,
        )
    # Unclear (409, 5xx, a 2xx without an order_id): the target may hold the order.
    reason = f"{target} answered {said} without a clear outcome"
    wait = result.retry_after_s or 0.0
    return _unclear(caller, reason, attempts, hold=result.status >= 500, wait_s=wait)


def _failed(exc: UpstreamError, caller: Caller, target: str, attempts: Attempts) -> Action:
    if isinstance(exc, UpstreamAmbiguous):  # sent; the answer never came whole
        return _unclear(caller, f"{target} unclear: {exc}", attempts, hold=True)
    reason = f"{target}: {exc}"  # nothing left: no connection, DNS, TLS
    if caller is Caller.FORWARD:
        return Action(Step.NEXT, "unavailable", reason)
    if caller is Caller.RECOVER and attempts.transient + 1 >= MAX_TRANSIENT:
        return Action(
            Step.GIVE_UP, "unavailable", f"center kept failing: {reason}", kind=Kind.TRANSIENT
        )
    return Action(Step.RETRY, "unavailable", reason, hold=True, kind=Kind.TRANSIENT)


def _unclear(
    caller: Caller, reason: str, attempts: Attempts, hold: bool, wait_s: float = 0.0
) -> Action:
    if caller is Caller.FORWARD:
        return Action(Step.BUFFER, Outcome.UNCLEAR.value, reason, pin=True)
    if caller is Caller.RECOVER and attempts.transient + 1 >= MAX_TRANSIENT:
        return Action(
            Step.GIVE_UP,
            Outcome.UNCLEAR.value,
            f"center kept failing: {reason}",
            pin=True,
            kind=Kind.TRANSIENT,
        )
    return Action(
        Step.RETRY,
        Outcome.UNCLEAR.value,
        reason,
        pin=True,
        hold=hold,
        wait_s=wait_s,
        kind=Kind.TRANSIENT,
    )
