"""An example chain step class (``kind = "tests.support.chain_plugin:ExampleStep"``).

The interface of CONTRACT 10's entry-point steps, for systems reached through
an SDK rather than HTTP: a class made with no arguments, an async ``check``
returning a ``CheckResult``, an optional async ``repair``. This one stands in
for a warehouse system's SDK: the order is "in the WMS" when its body carries a
``wms_code``; an order whose channel_order_id is "sdk-down" makes the SDK raise
(a downstream outage: retried, never failed).
"""

from __future__ import annotations

from agent.base.template import load_json
from agent.chain.steps import ChainOrder, CheckResult, Outcome


class ExampleStep:
    def __init__(self) -> None:
        self.repairs: list[str] = []

    async def check(self, order: ChainOrder) -> CheckResult:
        if order.channel_order_id == "sdk-down":
            raise ConnectionError("WMS SDK: connection reset")
        body = load_json(order.body or "{}")
        code = body.get("wms_code")
        if code is None:
            return CheckResult(Outcome.FAILED, "the order has no wms_code")
        return CheckResult(Outcome.VERIFIED, f"wms_code {code}")


class NotAStep:
    """No check(): refused at start-up."""
