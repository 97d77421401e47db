"""The ledger's counts per step and state, kept in memory so /status never scans the ledger.

Set once from the ledger at start (one GROUP BY), then moved by each committed
change (an enrolment, a check's result, a prune). "Overdue" is a view of
"pending" past ``delivered_at + deadline``: pending steps are counted per
second of delivery, so a step shows overdue at most a second late.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from agent.chain.states import FAILED, OVERDUE, PENDING, STATES, VERIFIED

# (step, stored state, delivered_at, +1 or -1): one committed change of one step row
Delta = tuple[str, str, float, int]


class Tally:
    def __init__(self, steps: Iterable[str]) -> None:
        self._steps = tuple(steps)
        self._done: dict[str, Counter[str]] = {s: Counter() for s in self._steps}
        self._pending: dict[str, Counter[int]] = {s: Counter() for s in self._steps}

    def apply(self, deltas: Iterable[Delta]) -> None:
        for step, state, delivered_at, n in deltas:
            if step not in self._done:
                continue  # a step no longer configured
            if state == PENDING:
                second = math.floor(delivered_at)
                self._pending[step][second] += n
                if not self._pending[step][second]:
                    del self._pending[step][second]
            else:
                self._done[step][state] += n

    def view(self, deadline_s: float, now: float) -> dict[str, dict[str, int]]:
        """step -> {state: count}, every configured step and state present (0 included)."""
        cutoff = now - deadline_s  # delivered before it and still pending: overdue
        out = {}
        for step in self._steps:
            overdue = sum(n for second, n in self._pending[step].items() if second + 1 <= cutoff)
            pending = sum(self._pending[step].values()) - overdue
            counts = dict.fromkeys(STATES, 0)
            counts.update(
                {
                    VERIFIED: self._done[step][VERIFIED],
                    FAILED: self._done[step][FAILED],
                    PENDING: pending,
                    OVERDUE: overdue,
                }
            )
            out[step] = counts
        return out
