"""The one promise under crashes: an order that got a 2xx is never lost, never created twice.

Every test here runs the agent as a real subprocess (``python -m agent run``)
against a real FakeCenter on loopback, kills it with real signals, restarts it
on the same config and counts creates per dedupe key at the center. Moments
are chosen by counting (acks, files, requests seen), never by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.fakes import FakeCenter
from tests.support.harness import AgentProcess, order, wait_for, write_config

pytestmark = pytest.mark.slow

ACKED = frozenset({200, 201, 202})
CLIENTS = 16


# -- local helpers ----------------------------------------------------------------------


def client() -> aiohttp.ClientSession:
    """A fresh client session: pooled connections to a killed agent are dead."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=30)
    )


async def post(
    session: aiohttp.ClientSession, url: str, raw: bytes, headers: dict[str, str] | None = None
) -> tuple[int | None, dict[str, Any]]:
    """POST one order; (None, {"error": ...}) when the connection failed (not acknowledged)."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        async with session.post(f"{url}/v1/orders", data=raw, headers=hdrs) as r:
            return r.status, orjson.loads(await r.read())
    except (TimeoutError, aiohttp.ClientError) as exc:
        return None, {"error": repr(exc)}


def order_files(directory: Path) -> list[str]:
    """Visible order files (no temp files, no reason files)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        n
        for n in names
        if n.endswith(".json") and not n.startswith(".") and not n.endswith(".reason.json")
    )


def read_records(directory: Path) -> dict[str, dict[str, Any]]:
    """serial -> record of every order file in ``directory``."""
    out = {}
    for name in order_files(directory):
        doc = orjson.loads((directory / name).read_bytes())
        out[doc["serial"]] = doc
    return out


def log_tail(tmp_path: Path, n: int = 3000) -> str:
    path = tmp_path / "agent.log"
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no agent.log>"


async def start_agent(
    factory: Any,
    config: Path,
    session: aiohttp.ClientSession,
) -> AgentProcess:
    agent: AgentProcess = factory(config)
    agent.start()
    await agent.wait_ready(session)
    return agent


async def reap(agent: AgentProcess, timeout: float = 20) -> int:
    """Wait for the process to exit without blocking the loop (the center lives in it)."""
    return await agent.reap(timeout)


async def stop_gracefully(agent: AgentProcess) -> int:
    agent.kill(signal.SIGTERM)
    return await reap(agent)


def counter(serial: str) -> int:
    """The per-node counter of a serial ``{NODE}-{YYYYMMDD}-{counter}``."""
    return int(serial.rsplit("-", 1)[1])


def orders_for(prefix: str, n: int) -> dict[str, bytes]:
    """dedupe key -> raw body; every third order has a customer phone."""
    bodies = {}
    for i in range(n):
        extra = {"customer_phone": f"138{i % 100_000_000:08d}"} if i % 3 == 0 else {}
        bodies[f"douyin:{prefix}-{i}"] = orjson.dumps(order(f"{prefix}-{i}", **extra))
    return bodies


async def send_all(
    session: aiohttp.ClientSession,
    url: str,
    bodies: dict[str, bytes],
    keys: Iterable[str],
    clients: int = CLIENTS,
) -> dict[str, tuple[int | None, dict[str, Any]]]:
    """Send ``keys`` from ``clients`` concurrent clients; key -> (status, body)."""
    queue = deque(keys)
    answers: dict[str, tuple[int | None, dict[str, Any]]] = {}

    async def worker() -> None:
        while queue:
            key = queue.popleft()
            answers[key] = await post(session, url, bodies[key])

    await asyncio.gather(*(worker() for _ in range(clients)))
    return answers


async def load_until_kill(
    session: aiohttp.ClientSession,
    agent: AgentProcess,
    bodies: dict[str, bytes],
    kill_at: int,
    tmp_path: Path,
) -> tuple[dict[str, str], dict[str, int]]:
    """Send ``bodies`` from 16 clients; SIGKILL the agent once ``kill_at`` were acked.

    Returns (key -> serial, key -> status) of every 2xx answer. An answer that
    arrives after the kill was still sent by the agent after durability: it counts.
    Connection errors after the kill are not acknowledgements; the clients stop.
    """
    queue = deque(bodies)
    acked: dict[str, str] = {}
    statuses: dict[str, int] = {}
    refused: list[tuple[str, int | None, Any]] = []  # non-2xx before the kill: a bug
    killed = False

    async def worker() -> None:
        nonlocal killed
        while queue and not killed:
            key = queue.popleft()
            status, body = await post(session, agent.url, bodies[key])
            if status in ACKED:
                acked[key] = body["serial"]
                statuses[key] = status
                if len(acked) >= kill_at and not killed:
                    killed = True
                    agent.kill(signal.SIGKILL)
            elif not killed:
                refused.append((key, status, body))

    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    assert killed, "the load finished before the kill point"
    assert await reap(agent) == -signal.SIGKILL
    assert not refused, f"non-2xx answers before the kill: {refused[:5]}\n{log_tail(tmp_path)}"
    return acked, statuses


def assert_exactly_once(center: FakeCenter, keys: Iterable[str], what: str) -> None:
    keys = set(keys)
    assert center.duplicates() == {}, f"created twice at the center: {center.duplicates()}"
    missing = sorted(k for k in keys if center.creates[k] != 1)
    assert not missing, f"{len(missing)} {what} not created exactly once, e.g. {missing[:5]}"
    assert center.created_keys() == keys, (
        f"unexpected keys created: {sorted(center.created_keys() - keys)[:5]}"
    )


# -- 1. kill -9 under load ----------------------------------------------------------------

N_LOAD = 2000


@pytest.mark.parametrize("kill_fraction", [0.1, 0.5, 0.9], ids=["at10pct", "at50pct", "at90pct"])
async def test_kill9_under_load_loses_nothing_and_creates_nothing_twice(
    tmp_path: Path, center: FakeCenter, agent_process: Any, kill_fraction: float
):
    t0 = time.monotonic()
    await center.go_down()
    config = write_config(tmp_path, center.url)
    spool = tmp_path / "spool"
    bodies = orders_for("load", N_LOAD)
    keys = list(bodies)
    kill_at = int(N_LOAD * kill_fraction)

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        acked, first_life = await load_until_kill(session, agent, bodies, kill_at, tmp_path)
    assert set(first_life.values()) == {202}, first_life  # the center was down: all buffered
    unacked = [k for k in keys if k not in acked]
    assert len(acked) >= kill_at and unacked

    # Every acknowledged order is durable in pending/ right now, under its serial.
    pending = read_records(spool / "pending")
    on_disk = {rec["dedupe_key"]: serial for serial, rec in pending.items()}
    lost = [k for k in acked if on_disk.get(k) != acked[k]]
    assert not lost, f"acknowledged but not in pending/ after kill -9: {lost[:5]}"

    # Second lifetime: the channels retry what got no 2xx, with the same bodies.
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        second = await send_all(session, agent.url, bodies, unacked)
        bad = {k: v for k, v in second.items() if v[0] not in (200, 202)}
        assert not bad, f"retries after restart not acknowledged: {list(bad.items())[:5]}"
        redelivered_dups = sum(1 for status, _ in second.values() if status == 200)
        # Serials issued after the restart are above every one the dead process used.
        first_counters = [counter(s) for s in [*acked.values(), *pending]]
        new_counters = [
            counter(body["serial"]) for status, body in second.values() if status == 202
        ]
        assert new_counters and min(new_counters) > max(first_counters), (
            "a serial counter was reused after kill -9"
        )
        for key, (_, body) in second.items():
            acked[key] = body["serial"]
        assert set(acked) == set(keys)

        await center.come_up()
        await wait_for(lambda: not order_files(spool / "pending"), 25, "pending/ to drain")
        exit_code = await stop_gracefully(agent)

    # Each key created exactly once; none twice; nothing rejected.
    assert_exactly_once(center, keys, "orders")
    assert os.listdir(spool / "rejected") == []
    # A serial is never issued twice across kill -9: one distinct serial per order ...
    assert len(set(acked.values())) == len(acked), "a serial was issued to two orders"
    # ... and the delivered files carry exactly the serials the channels were given.
    merged = read_records(spool / "merged")
    assert {rec["dedupe_key"]: serial for serial, rec in merged.items()} == acked
    assert len(merged) == N_LOAD
    for serial, rec in merged.items():
        assert rec["order_id"] == center.orders[rec["dedupe_key"]][0], serial
    assert exit_code == 0, log_tail(tmp_path)
    print(
        f"\nkill at {kill_fraction:.0%}: {len(first_life)} acked before kill, "
        f"{len(unacked)} retried ({redelivered_dups} were already durable -> 200), "
        f"{len(center.received)} center POSTs, {time.monotonic() - t0:.1f}s"
    )


async def test_kill9_while_forwarding_never_creates_twice(
    tmp_path: Path, center: FakeCenter, agent_process: Any
):
    """The center is up: orders in flight at the center when the agent dies are
    created there without an answer; the channel's retry must come back 2xx and
    the center must still hold one order per key (Idempotency-Key on every path)."""
    t0 = time.monotonic()
    center.delay_s = 0.01
    config = write_config(tmp_path, center.url)
    spool = tmp_path / "spool"
    bodies = orders_for("fwd", 1000)
    keys = list(bodies)

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        acked, first_life = await load_until_kill(session, agent, bodies, 500, tmp_path)
    # 201 normally; 202 if a slow health check or forward made the agent buffer instead.
    assert set(first_life.values()) <= {201, 202}, first_life
    unacked = [k for k in keys if k not in acked]
    created_unanswered = sorted(k for k in unacked if center.creates[k])
    for key, status in first_life.items():
        assert status == 202 or center.creates[key] == 1, f"{key} got 201, center lacks it"

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        second = await send_all(session, agent.url, bodies, unacked)
        bad = {k: v for k, v in second.items() if v[0] not in ACKED}
        assert not bad, f"retries after restart not acknowledged: {list(bad.items())[:5]}"
        for key, (_, body) in second.items():
            acked[key] = body["serial"]
        await wait_for(lambda: not order_files(spool / "pending"), 20, "pending/ to drain")
        assert await stop_gracefully(agent) == 0, log_tail(tmp_path)

    assert_exactly_once(center, keys, "orders")
    assert len(set(acked.values())) == len(keys), "a serial was issued to two orders"
    assert os.listdir(spool / "rejected") == []
    print(
        f"\nforwarding, kill at 50%: {len(first_life)} acked before kill "
        f"({sum(1 for st in first_life.values() if st == 201)} with 201), "
        f"{len(created_unanswered)} created at the center without an answer, "
        f"{len(center.received)} center POSTs, {time.monotonic() - t0:.1f}s"
    )


# -- 2. kill -9 while the drain is running ------------------------------------------------

N_DRAIN = 1500


async def test_kill9_during_drain_redelivers_as_duplicates_and_merges_once(
    tmp_path: Path, center: FakeCenter, agent_process: Any
):
    t0 = time.monotonic()
    await center.go_down()
    config = write_config(tmp_path, center.url)
    spool = tmp_path / "spool"
    bodies = orders_for("drain", N_DRAIN)
    keys = list(bodies)

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        answers = await send_all(session, agent.url, bodies, keys)
        assert {s for s, _ in answers.values()} == {202}, log_tail(tmp_path)
        acked = {k: body["serial"] for k, (_, body) in answers.items()}

        # 16 drain workers against a center that takes 50 ms per order: ~5 s of drain.
        center.delay_s = 0.05
        await center.come_up()

        def mid_drain() -> bool:
            done, left = len(order_files(spool / "merged")), len(order_files(spool / "pending"))
            return done >= N_DRAIN // 5 and left >= N_DRAIN // 5

        await wait_for(mid_drain, 30, "the drain to be under way", interval=0.005)
        agent.kill(signal.SIGKILL)
        assert await reap(agent) == -signal.SIGKILL
    merged_before = len(order_files(spool / "merged"))
    pending_before = len(order_files(spool / "pending"))
    received_before = len(center.received)
    assert 0 < merged_before < N_DRAIN and pending_before > 0

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        await wait_for(lambda: not order_files(spool / "pending"), 30, "pending/ to drain")

        # The index agrees with the files after the crash: every order reads as merged.
        async def lookup(key: str) -> tuple[int, dict[str, Any]]:
            async with session.get(f"{agent.url}/v1/orders/by-key/{key}") as r:
                return r.status, orjson.loads(await r.read())

        stale = []
        for key in keys[::25]:
            status, found = await lookup(key)
            if status != 200 or found["serial"] != acked[key] or found["state"] != "merged":
                stale.append((key, status, found))
        exit_code = await stop_gracefully(agent)

    assert_exactly_once(center, keys, "buffered orders")
    merged = read_records(spool / "merged")
    assert len(order_files(spool / "merged")) == N_DRAIN
    assert {rec["dedupe_key"]: serial for serial, rec in merged.items()} == acked
    for serial, rec in merged.items():
        assert rec["order_id"] == center.orders[rec["dedupe_key"]][0], serial
    assert order_files(spool / "pending") == []
    assert os.listdir(spool / "rejected") == []
    # How many keys reached the center more than once (redeliveries answered 200).
    sent_per_key: dict[str, int] = {}
    for r in center.received:
        sent_per_key[r.key] = sent_per_key.get(r.key, 0) + 1
    redelivered = sorted(k for k, n in sent_per_key.items() if n > 1)
    assert not stale, f"journal disagrees with the files after restart: {stale[:5]}"
    assert exit_code == 0, log_tail(tmp_path)
    print(
        f"\nkilled with {merged_before} merged / {pending_before} pending; "
        f"{received_before} center POSTs before, {len(center.received)} after; "
        f"{len(redelivered)} keys redelivered; {time.monotonic() - t0:.1f}s"
    )


# -- 3. SIGTERM is graceful ------------------------------------------------------------------


async def test_sigterm_finishes_in_flight_orders_refuses_new_ones_and_exits_0(
    tmp_path: Path, center: FakeCenter, agent_process: Any
):
    config = write_config(tmp_path, center.url)
    spool = tmp_path / "spool"
    bodies = orders_for("term", 20)
    late_bodies = orders_for("late", 200)
    center.delay_s = 1.0

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        in_flight = {
            k: asyncio.create_task(post(session, agent.url, raw)) for k, raw in bodies.items()
        }
        await wait_for(
            lambda: len(center.received) >= len(bodies),
            10,
            "all 20 orders to be in flight at the center",
        )
        agent.kill(signal.SIGTERM)

        # Meanwhile channels keep sending: whatever gets a 2xx must not be lost.
        late: dict[str, tuple[int | None, dict[str, Any]]] = {}
        late_keys = deque(late_bodies)

        async def late_sender() -> None:
            while late_keys:
                key = late_keys.popleft()
                late[key] = answer = await post(session, agent.url, late_bodies[key])
                if answer[0] is None:
                    return  # the listener is gone

        sender = asyncio.create_task(late_sender())
        await wait_for(
            lambda: "stopping: no new orders" in log_tail(tmp_path, 100_000),
            10,
            "the agent to log that it saw SIGTERM",
        )
        observed_key = "douyin:after-sigterm"
        after = await post(session, agent.url, orjson.dumps(order("after-sigterm")))
        answers = dict(zip(in_flight, await asyncio.gather(*in_flight.values()), strict=True))
        await sender
        exit_code = await reap(agent)

    assert exit_code == 0, log_tail(tmp_path)
    not_finished = {k: a for k, a in answers.items() if a[0] not in ACKED}
    assert not not_finished, f"in-flight orders not finished on SIGTERM: {not_finished}"
    assert after[0] in (None, 503), f"a POST after SIGTERM was answered {after}"
    late_statuses = {a[0] for a in late.values()}
    assert late_statuses <= {None, 503, 201, 202, 200}, late
    late_acked = {k: a[1]["serial"] for k, a in late.items() if a[0] in ACKED}

    # After a restart every acknowledged order is at the center or in pending/.
    center.delay_s = 0.0
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        pending = {rec["dedupe_key"] for rec in read_records(spool / "pending").values()}
        for key in [*bodies, *late_acked]:
            assert center.creates[key] == 1 or key in pending, f"{key} acknowledged but lost"
        await wait_for(lambda: not order_files(spool / "pending"), 10, "pending/ to drain")
        assert await stop_gracefully(agent) == 0, log_tail(tmp_path)
    assert_exactly_once(center, [*bodies, *late_acked], "acknowledged orders")
    assert observed_key not in center.creates
    print(
        f"\nSIGTERM: in-flight answers {sorted({a[0] for a in answers.values()})}; "
        f"late senders: {sorted(late_statuses, key=str)} ({len(late_acked)} acked); "
        f"post after SIGTERM observed -> {after[0]}"
    )


# -- 4. dedupe survives kill -9 -------------------------------------------------------------


async def test_dedupe_survives_kill9(tmp_path: Path, center: FakeCenter, agent_process: Any):
    await center.go_down()
    config = write_config(tmp_path, center.url)
    bodies = orders_for("dedupe", 40)
    header_key = {"Idempotency-Key": "shop-77:A-1"}
    header_body = orjson.dumps(order("hdr-1"))

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        first = await send_all(session, agent.url, bodies, bodies)
        assert {s for s, _ in first.values()} == {202}, first
        serials = {k: body["serial"] for k, (_, body) in first.items()}
        status, body = await post(session, agent.url, header_body, header_key)
        assert status == 202, body
        serials["shop-77:A-1"] = body["serial"]
        agent.kill(signal.SIGKILL)
        assert await reap(agent) == -signal.SIGKILL

    async def check_repeats(url: str, session: aiohttp.ClientSession, state: str) -> None:
        again = await send_all(session, url, bodies, bodies)
        for key, (status, body) in again.items():
            assert (status, body) == (200, {"status": "duplicate", "serial": serials[key]}), key
        status, body = await post(session, url, header_body, header_key)
        assert (status, body) == (200, {"status": "duplicate", "serial": serials["shop-77:A-1"]})
        for key in ("douyin:dedupe-0", "douyin:dedupe-7", "shop-77:A-1"):
            changed = order(
                key.split(":", 1)[1] if key != "shop-77:A-1" else "hdr-1", amount="1.00"
            )
            hdrs = header_key if key == "shop-77:A-1" else None
            status, body = await post(session, url, orjson.dumps(changed), hdrs)
            assert status == 422 and body["serial"] == serials[key], (key, status, body)
            async with session.get(f"{url}/v1/orders/by-key/{key}") as r:
                found = orjson.loads(await r.read())
            assert r.status == 200 and found["serial"] == serials[key], found
            assert found["state"] == state, found

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        await check_repeats(agent.url, session, "buffered")
        assert center.received == []
        # Deliver, kill -9 again, restart: still duplicates, still one create each.
        await center.come_up()
        spool = tmp_path / "spool"
        await wait_for(lambda: not order_files(spool / "pending"), 10, "pending/ to drain")
        await wait_for(lambda: set(center.creates) == set(serials), 10, "every create")
        agent.kill(signal.SIGKILL)
        assert await reap(agent) == -signal.SIGKILL

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        received = len(center.received)
        await check_repeats(agent.url, session, "merged")
        assert len(center.received) == received, "a repeat reached the center"
        assert await stop_gracefully(agent) == 0, log_tail(tmp_path)
    assert_exactly_once(center, serials, "orders")


# -- 5. kill -9 between the merged/ copy and the pending/ unlink ----------------------------


async def test_kill9_between_merged_copy_and_pending_unlink_heals_the_index(
    tmp_path: Path, center: FakeCenter, agent_process: Any
):
    """``buffer.finish_merged`` writes merged/{serial}.json durably, then unlinks
    pending/{serial}.json. A kill -9 between the two leaves both files, a journal
    row still "buffered", and the order created at the center. We rebuild exactly
    that state (the agent's own pending file, the copy finish_merged writes, the
    create at the center), restart, and ask where the order is."""
    await center.go_down()
    config = write_config(tmp_path, center.url)
    spool = tmp_path / "spool"
    key = "douyin:window-1"
    raw = orjson.dumps(order("window-1"))

    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        status, body = await post(session, agent.url, raw)
        assert status == 202, body
        serial = body["serial"]
        agent.kill(signal.SIGKILL)
        assert await reap(agent) == -signal.SIGKILL

        # What the drain had done when it died: the center confirmed, merged/ copy durable.
        await center.come_up()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-Edge-Serial": serial,
            "X-Edge-Node": "wh-test-01",
        }
        async with session.post(f"{center.url}/orders", data=raw, headers=headers) as r:
            assert r.status == 201
        name = f"{serial}.json"
        record = orjson.loads((spool / "pending" / name).read_bytes())
        record.update(order_id=center.orders[key][0], cluster="primary", merged_at=time.time())
        (spool / "merged" / name).write_bytes(orjson.dumps(record))

        agent = await start_agent(agent_process, config, session)
        await wait_for(lambda: not order_files(spool / "pending"), 10, "pending/ to drain")
        assert order_files(spool / "merged") == [name]
        assert center.creates[key] == 1 and center.duplicates() == {}

        async def where() -> dict[str, Any]:
            async with session.get(f"{agent.url}/v1/orders/by-key/{key}") as r:
                found: dict[str, Any] = orjson.loads(await r.read())
            async with session.get(f"{agent.url}/status") as r:
                found["status"] = orjson.loads(await r.read())
            return found

        async def merged_in_index() -> bool:
            return (await where())["state"] == "merged"

        try:
            await wait_for(merged_in_index, 3, "the journal to say merged")
            healed = None
        except AssertionError:
            healed = await where()
        exit_code = await stop_gracefully(agent)
    assert healed is None, (
        f"pending/ is empty and merged/ holds {name}, but the agent still answers "
        f"state={healed['state']!r} for {key}; /status journal_buffered="
        f"{healed['status']['journal_buffered']}, oldest_pending_age_s="
        f"{healed['status']['oldest_pending_age_s']} (the drain's already_merged path drops "
        "the pending copy without journal.mark(MERGED))"
    )
    assert exit_code == 0, log_tail(tmp_path)
