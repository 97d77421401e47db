"""The delivery table: every status and failure phase of CONTRACT 7, for each caller.

Written out row by row (not recomputed from the code under test): this is what
ops are told an answer means, for the forward path (F), the drain (D) and
edge-recover (R).
"""

from __future__ import annotations

import pytest

from agent.delivery.decide import (
    MAX_BUSY,
    MAX_TRANSIENT,
    Attempts,
    Caller,
    Kind,
    Step,
    decide,
)
from agent.errors import DnsError, UpstreamAmbiguous, UpstreamError, UpstreamUnavailable
from agent.upstream.answers import Answer

F, D, R = Caller.FORWARD, Caller.DRAIN, Caller.RECOVER
MERGE, QUAR, NEXT, BUF, RETRY, GIVE = (
    Step.MERGE,
    Step.QUARANTINE,
    Step.NEXT,
    Step.BUFFER,
    Step.RETRY,
    Step.GIVE_UP,
)

# (what came back, caller) -> (step, pin, hold, refusing, slow_down)
ROWS: list[tuple[str, Answer | UpstreamError, Caller, tuple[Step, bool, bool, bool, bool]]] = []


def rows(
    label: str,
    result: Answer | UpstreamError,
    f: tuple[Step, bool, bool, bool, bool],
    d: tuple[Step, bool, bool, bool, bool],
    r: tuple[Step, bool, bool, bool, bool],
) -> None:
    for caller, want in ((F, f), (D, d), (R, r)):
        ROWS.append((label, result, caller, want))


def no(step: Step) -> tuple[Step, bool, bool, bool, bool]:
    return (step, False, False, False, False)


# Created, or seen before: delivered everywhere.
rows("201 with order_id", Answer(201, "C-1"), no(MERGE), no(MERGE), no(MERGE))
rows("200 duplicate with order_id", Answer(200, "C-1"), no(MERGE), no(MERGE), no(MERGE))
# A 2xx is proof of creation only with an order_id: else unclear, pinned, never merged.
for status in (200, 201, 202, 204):
    rows(
        f"{status} without order_id",
        Answer(status, None),
        (BUF, True, False, False, False),
        (RETRY, True, False, False, False),
        (RETRY, True, False, False, False),
    )
rows(
    "201 with an empty order_id",
    Answer(201, ""),
    (BUF, True, False, False, False),
    (RETRY, True, False, False, False),
    (RETRY, True, False, False, False),
)
# 409: the key is still being processed there: it may hold it: pinned, retried there.
rows(
    "409 in progress",
    Answer(409),
    (BUF, True, False, False, False),
    (RETRY, True, False, False, False),
    (RETRY, True, False, False, False),
)
# 422: same key, different body: quarantined.
rows("422 conflict", Answer(422, error="different body"), no(QUAR), no(QUAR), no(QUAR))
# 408/425/429: clearly not taken: the forward tries the next cluster, the others wait.
rows("408", Answer(408), no(NEXT), no(RETRY), no(RETRY))
rows("425", Answer(425), no(NEXT), no(RETRY), no(RETRY))
rows(
    "429",
    Answer(429, retry_after_s=3),
    (NEXT, False, False, False, True),
    (RETRY, False, False, False, True),
    (RETRY, False, False, False, True),
)
# 503: not taken; the target is unavailable: the drain stops sending to it for now.
rows(
    "503",
    Answer(503),
    (NEXT, False, False, False, True),
    (RETRY, False, True, False, True),
    (RETRY, False, True, False, True),
)
# The cluster refuses the agent: never quarantined, never pinned; the cluster is held.
for status in (401, 403, 404, 405, 407):
    rows(
        f"{status} refuses the agent",
        Answer(status),
        (NEXT, False, True, True, False),
        (RETRY, False, True, True, False),
        (GIVE, False, True, True, False),
    )
# Other 4xx: the order itself is refused for good.
for status in (400, 410, 413, 415, 451):
    rows(f"{status} rejects the order", Answer(status), no(QUAR), no(QUAR), no(QUAR))
# 5xx other than 503: unclear (it may have created it): pinned; the target is failing.
for status in (500, 502, 504, 599):
    rows(
        f"{status}",
        Answer(status),
        (BUF, True, False, False, False),
        (RETRY, True, True, False, False),
        (RETRY, True, True, False, False),
    )
# 1xx/3xx reaching us as a final answer: unclear.
rows(
    "302 redirect",
    Answer(302),
    (BUF, True, False, False, False),
    (RETRY, True, False, False, False),
    (RETRY, True, False, False, False),
)
# Failure phases: nothing sent (refused, DNS, TLS) vs sent without a whole answer.
rows(
    "connection refused",
    UpstreamUnavailable("refused"),
    no(NEXT),
    (RETRY, False, True, False, False),
    (RETRY, False, True, False, False),
)
rows(
    "DNS failure",
    DnsError("NXDOMAIN"),
    no(NEXT),
    (RETRY, False, True, False, False),
    (RETRY, False, True, False, False),
)
rows(
    "timeout after sending",
    UpstreamAmbiguous("timeout"),
    (BUF, True, False, False, False),
    (RETRY, True, True, False, False),
    (RETRY, True, True, False, False),
)


@pytest.mark.parametrize(
    ("label", "result", "caller", "want"), ROWS, ids=[f"{r[0]}-{r[2].value}" for r in ROWS]
)
def test_the_table(
    label: str,
    result: Answer | UpstreamError,
    caller: Caller,
    want: tuple[Step, bool, bool, bool, bool],
) -> None:
    action = decide(result, caller, "primary")
    assert (action.step, action.pin, action.hold, action.refusing, action.slow_down) == want


def test_every_contract_status_is_in_the_table() -> None:
    statuses = {r[1].status for r in ROWS if isinstance(r[1], Answer)}
    contract = {200, 201, 409, 422, 408, 425, 429, 401, 403, 404, 405, 407, 500, 502, 503, 504}
    assert contract <= statuses


def test_a_pin_never_lets_an_order_go_elsewhere() -> None:
    """The promise in one line: whatever may have created the order never says 'next'."""
    for _, result, caller, _ in ROWS:
        action = decide(result, caller, "primary")
        if action.pin:
            assert action.step not in (Step.NEXT, Step.MERGE, Step.QUARANTINE)
        assert action.created_nothing == (not action.pin and not action.settles)


def test_retry_after_is_the_least_wait() -> None:
    assert decide(Answer(429, retry_after_s=7.5), Caller.DRAIN, "primary").wait_s == 7.5
    assert decide(Answer(503, retry_after_s=2), Caller.RECOVER, "primary").wait_s == 2
    assert decide(Answer(500, retry_after_s=4), Caller.RECOVER, "primary").wait_s == 4
    assert decide(Answer(429), Caller.RECOVER, "primary").wait_s == 1.0


def test_edge_recover_gives_up_after_its_budgets_and_keeps_the_order() -> None:
    tries = Attempts()
    for _ in range(MAX_TRANSIENT - 1):
        action = decide(Answer(502), Caller.RECOVER, "primary", tries)
        assert action.step is Step.RETRY and action.kind is Kind.TRANSIENT
        tries = tries.after(action)
    last = decide(Answer(502), Caller.RECOVER, "primary", tries)
    assert last.step is Step.GIVE_UP and last.pin  # left pending, still pinned
    assert "kept failing" in last.reason

    tries = Attempts()
    for _ in range(MAX_BUSY - 1):
        tries = tries.after(decide(Answer(429), Caller.RECOVER, "primary", tries))
    assert tries.busy == MAX_BUSY - 1 and tries.transient == 0
    assert decide(Answer(429), Caller.RECOVER, "primary", tries).step is Step.GIVE_UP
    # The drain has no budget: a buffered order is never given up.
    assert decide(Answer(502), Caller.DRAIN, "primary", Attempts(99, 99)).step is Step.RETRY


def test_reasons_name_the_target_and_the_answer() -> None:
    action = decide(Answer(403, error="bad token"), Caller.DRAIN, "standby")
    assert "standby" in action.reason and "403" in action.reason and "bad token" in action.reason
