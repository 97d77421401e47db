"""The drill scenarios, each a small declarative script of steps."""

from __future__ import annotations

from agent.drill.chain import ChainRecover, ChainSettled, HoldInvoice
from agent.drill.replica import AllAccepted, KillNatsNode, LoseServer, SerialsMatch, Takeover
from agent.drill.steps import (
    Context,
    Fail,
    Flap,
    KillAgent,
    Merge,
    Predicate,
    Restore,
    StartLoad,
    Step,
    StopAgent,
    SwitchDns,
    WaitLoad,
    WaitUntil,
)


def _created_on(center: str) -> Predicate:
    def pred(ctx: Context) -> bool:
        return len(ctx.sandbox.centers[center].creates) > 0

    return pred


def _mode(mode: str) -> Predicate:
    async def pred(ctx: Context) -> bool:
        return bool((await ctx.status())["mode"] == mode)

    return pred


def _pinned(cluster: str) -> Predicate:
    async def pred(ctx: Context) -> bool:
        return bool((await ctx.status())["pinned"][cluster] > 0)

    return pred


def _drained(ctx: Context) -> bool:
    return ctx.agent.pending() == 0


def _sms_sent(ctx: Context) -> bool:
    sent = ctx.sandbox.sms.per_serial()
    return all(serial in sent for load in ctx.loads for serial in load.sms_queued)


SCENARIOS: dict[str, list[Step]] = {
    # The primary stops answering under load: orders move to the standby.
    "primary-outage": [
        StartLoad(),
        Fail("primary", "refuse"),
        WaitUntil(
            "a create on the standby",
            _created_on("standby"),
            record="failover_s",
            since="fail:primary",
        ),
        WaitUntil("mode standby", _mode("standby")),
        WaitLoad(),
        Restore("primary"),
        WaitUntil("mode normal", _mode("normal"), record="failback_s", since="restore:primary"),
    ],
    # Both clusters down: every order is buffered and its customer gets one SMS.
    "total-outage": [
        Fail("primary", "refuse"),
        Fail("standby", "503"),
        WaitUntil("mode offline", _mode("offline")),
        StartLoad(),
        WaitLoad(),
        WaitUntil("one SMS per buffered order with a phone", _sms_sent),
    ],
    # The primary returns after a total outage: the buffer drains to it by itself.
    "recovery": [
        Fail("primary", "refuse"),
        Fail("standby", "refuse"),
        WaitUntil("mode offline", _mode("offline")),
        StartLoad(),
        WaitLoad(),
        Restore("primary"),
        WaitUntil("pending/ to drain", _drained, record="drain_s", since="restore:primary"),
    ],
    # Ops point the primary's DNS name at another cluster: orders follow within a TTL.
    "dns-switch": [
        StartLoad(0.5),
        WaitLoad(),
        SwitchDns("spare"),
        StartLoad(0.5, rate=40),  # spread over the TTL, so the switch shows mid-load
        WaitUntil(
            "a create on the new primary",
            _created_on("spare"),
            record="failover_s",
            since="dns-switch",
        ),
        WaitLoad(),
    ],
    # kill -9 while orders are being buffered; restart; the channel retries.
    "agent-crash": [
        Fail("primary", "refuse"),
        Fail("standby", "refuse"),
        WaitUntil("mode offline", _mode("offline")),
        StartLoad(),
        KillAgent(0.5),
        Restore(),
    ],
    # Merge a buffer with edge-recover, kill it midway, run it again.
    "merge-resume": [
        Fail("primary", "refuse"),
        Fail("standby", "refuse"),
        WaitUntil("mode offline", _mode("offline")),
        StartLoad(),
        WaitLoad(),
        StopAgent(),
        Restore("primary"),
        Merge(kill_at=0.4),
    ],
    # The clusters keep separate idempotency stores. The standby creates orders but
    # answers too late: each is buffered pinned to it, drained back only to it, never
    # to the primary; the rest drain to the primary. created twice must stay 0.
    "split-stores": [
        Fail("primary", "refuse"),
        WaitUntil("mode standby", _mode("standby")),
        Fail("standby", "late-create"),
        StartLoad(0.5, rate=40),
        WaitLoad(),
        WaitUntil("orders pinned to the standby", _pinned("standby")),
        Fail("standby", "refuse"),
        Restore("primary"),
        WaitUntil("mode normal", _mode("normal")),
        Restore("standby"),
        WaitUntil("pending/ to drain", _drained, record="drain_s", since="restore:standby"),
    ],
    # After a total outage, the outage orders are verified downstream (CONTRACT 10): the
    # tracking re-pushed and verified, the lagging invoices verified late, the truncated
    # finance postings failed with both values, one invoice never issued overdue; and
    # edge-recover --mode chain over the same buffer agrees.
    "full-chain": [
        Fail("primary", "refuse"),
        Fail("standby", "refuse"),
        WaitUntil("mode offline", _mode("offline")),
        StartLoad(0.2),
        WaitLoad(),
        HoldInvoice(),
        Restore("primary"),
        WaitUntil("pending/ to drain", _drained, record="drain_s", since="restore:primary"),
        ChainSettled(),
        ChainRecover(),
    ],
    # The primary flaps every 300 ms under load.
    "flapping-primary": [
        StartLoad(rate=60),
        Flap("primary", period=0.3, duration=4.0),
        WaitLoad(),
    ],
    # A warehouse group (CONTRACT 11): the agent replicates its buffer to a three-node NATS
    # cluster; one NATS node is killed during intake and orders are still taken; then the
    # server is lost mid-outage (kill -9, state and buffer deleted) after its customers got
    # their SMS. Another machine merges its orders from the replica: each created once,
    # under the serial its customer holds; edge-recover --mode verify agrees.
    "server-lost": [
        Fail("primary", "refuse"),
        Fail("standby", "refuse"),
        WaitUntil("mode offline", _mode("offline")),
        StartLoad(0.1),
        WaitLoad(),
        AllAccepted(),
        StartLoad(0.1, rate=50),
        KillNatsNode(at=0.3),
        WaitLoad(),
        AllAccepted(retry_s=30, record="nats_failover_s", since="nats-kill"),
        WaitUntil("one SMS per buffered order with a phone", _sms_sent),
        LoseServer(),
        Restore("primary"),
        Takeover(),
        SerialsMatch(),
    ],
}

# Scenarios that need a real NATS cluster (nats-server installed); SKIPPED without one.
NEEDS_NATS = frozenset({"server-lost"})
