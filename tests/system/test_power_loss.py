"""Pull the power: the one promise when everything not fsync'd is gone (issue 13).

kill -9 keeps what the kernel accepted (page cache, unsynced SQLite WAL frames); a
warehouse server that loses power keeps only what reached the disk. Here the real
agent (a subprocess) runs with buffer.path and state_dir on LazyFS; at each cut point
every process of ours is SIGKILLed and ``lazyfs::clear-cache`` drops every unsynced
byte. Then the agent is restarted by itself, the clusters come back, clients retry
whatever was not acknowledged, the buffer drains, and World.check() asserts what a
user would check (see tests/support/powerloss_harness.py).

Cut moments are chosen by observable progress (acks, files in pending/, creates at a
cluster, SMS at the gateway), never by sleeping. Run: ``pytest -m power_loss``.

Cut points (power cut = SIGKILL agent and edge-recover, then clear-cache):

  offline intake    after the 1st 202 (block just reserved); after 25 x 202; at 80 files
  forwarding        after 5 x 201; after 60 x 201; created at the primary, replies held;
                    requests at the primary, created only after the cut
  failover          standby taking orders (30 x 201); primary dies mid-load (20 creates at
                    the standby); primary hangs past upstream.timeout_s (ambiguous, buffered)
  drain             first 5 creates; 60 files in merged/; drain plus new forwarded orders
  SMS               10 messages sent; messages taken but unanswered ("sending"); all queued
  inbox pick-up     offline (30 files in pending/); forwarding (30 creates)
  retention         after a full drain, then during merged/ expiry at start-up (2 cuts)
  edge-recover      merge beside the draining agent, --batch 100 and --batch 1
  chain ledger      the verifier writing check results and repairs (60 orders re-pushed)
  serials/start-up  two cuts in a row; a cut right after the restarted agent listens

LazyFS faults: crash right after a pending temp file's fsync (before its rename); crash
in a journal commit; crash right after the outbox's "sending" commit; a torn write of a
pending temp file; and a disk that fails under the running agent (JSON 503, /readyz 503).

With replication (issue 22): the scenarios that exercise it run a second time
(``[...replicated]``) with ``[replication]`` on against a real three-node nats-server
cluster on loopback, whose store is on a normal disk (the other warehouse servers
survive the cut); tests/support/powerloss_replica.py adds the replica's view to the
checks. Only replicated: the server lost with its disk after the cut (with a healthy
replica, and with the stream's two followers down before the cut) and taken over from
the replica, and a returning server cut while it moves what a takeover delivered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import orjson
import pytest

from agent.sandbox.downstream import Downstream, chain_steps
from agent.sandbox.nats_cluster import NatsCluster
from tests.support.nats_cluster import ensure_nats_server
from tests.support.powerloss_fs import LazyFs, build, unavailable_reason
from tests.support.powerloss_harness import Proc, World, cut_when, orders, wait_until
from tests.support.powerloss_replica import ReplicaView, fresh_node_id

# LazyFS itself still crashes now and then under many concurrent writes (SIGSEGV in its
# page cache, libpcache: an upstream race that shared/lazyfs/PATCHES.md makes rarer, not
# gone; seen once in ~10 runs of this module). The mount then answers ENOTCONN to
# everyone, and the scenario can say nothing about the agent: it is run once more from
# the start on a fresh mount (reported as RERUN). Only that error; a second crash fails.
LAZYFS_DIED = r"Transport endpoint is not connected"
pytestmark = [
    pytest.mark.power_loss,
    pytest.mark.timeout(180),
    pytest.mark.flaky(reruns=1, only_rerun=[LAZYFS_DIED]),
]

_REASON = unavailable_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="module")
def lazyfs() -> Iterator[LazyFs]:
    fs = LazyFs(build())
    fs.mount()
    try:
        yield fs
    finally:
        fs.destroy()


# The scenarios that exercise replication run twice: as they are, and with [replication]
# on ("replicated"); ONLY_REPLICATED: scenarios that mean nothing without it.
REPLICATED = pytest.mark.parametrize(
    "replica_cluster", [False, True], ids=["local", "replicated"], indirect=True
)
ONLY_REPLICATED = pytest.mark.parametrize(
    "replica_cluster", [True], ids=["replicated"], indirect=True
)


@pytest.fixture(scope="module")
def power_loss_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three nats-server nodes for the module (started once, on the first replicated
    scenario); each world replicates under a node id of its own. Their store is on the
    normal disk: the power cut is the agent's server's, not theirs."""
    ensure_nats_server()
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    cluster.start()
    try:
        _ready(cluster)
        yield cluster
    finally:
        cluster.stop()


def _ready(cluster: NatsCluster) -> None:
    """wait_ready from a sync fixture: on a thread of its own, off the test's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, cluster.wait_ready(60)).result()


@pytest.fixture
def replica_cluster(request: pytest.FixtureRequest) -> NatsCluster | None:
    """The NATS cluster when the scenario runs replicated (REPLICATED), else None."""
    if not getattr(request, "param", False):
        return None
    cluster: NatsCluster = request.getfixturevalue("power_loss_nats")
    if not all(node.running for node in cluster.nodes):  # a scenario killed some
        cluster.start()
        _ready(cluster)
    return cluster


@pytest.fixture
async def world_factory(
    lazyfs: LazyFs, replica_cluster: NatsCluster | None, request: pytest.FixtureRequest
) -> AsyncIterator[object]:
    lazyfs.ensure_mounted()
    worlds: list[World] = []

    async def make(
        primary: bool = True,
        standby: bool = True,
        sms: bool = True,
        prefix: tuple[str, ...] = (),
        **overrides: dict[str, object],
    ) -> World:
        name = request.node.name.replace("[", "-").replace("]", "")
        if replica_cluster is not None:
            node = {"node_id": fresh_node_id(), **overrides.get("agent", {})}
            overrides = {**overrides, "agent": node}
        w = World(lazyfs, f"{name}-{len(worlds)}", **overrides)
        if replica_cluster is not None:
            w.replica = ReplicaView(replica_cluster, w.node_id)
        w.agent_prefix = list(prefix)  # e.g. strace holding syscalls
        worlds.append(w)
        await w.start(primary=primary, standby=standby, sms=sms)
        return w

    yield make
    for w in worlds:
        await w.close()
    # Unlinking frees LazyFS cache pages; a dead mount is remounted by the next test.
    if lazyfs.alive():
        for w in worlds:
            await asyncio.to_thread(_rmtree, w.dir)


def _rmtree(path: os.PathLike[str]) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# == offline intake: both clusters down, orders buffered with a 202 ====================


@pytest.mark.parametrize(
    "acks,replica_cluster",
    [(1, False), (25, False), (25, True)],
    ids=["1", "25", "25-replicated"],
    indirect=["replica_cluster"],
)
async def test_offline_intake_cut_after_acks(world_factory, acks: int) -> None:
    w = await world_factory(primary=False, standby=False)
    w.start_load(orders(f"off{acks}", 160))
    await cut_when(w, lambda: w.ledger.acks(202) >= acks, f"{acks} x 202")
    await w.recover_and_check()


@REPLICATED
async def test_offline_intake_cut_at_80_pending_files(world_factory) -> None:
    w = await world_factory(primary=False, standby=False)
    w.start_load(orders("offp", 200))
    await cut_when(w, lambda: len(w.pending()) >= 80, "80 files in pending/")
    await w.recover_and_check()


# == forwarding: the primary takes orders, 201 ========================================


@pytest.mark.parametrize("acks", [5, 60])
async def test_forwarding_cut_after_acks(world_factory, acks: int) -> None:
    w = await world_factory()
    w.start_load(orders(f"fwd{acks}", 200))
    await cut_when(w, lambda: w.ledger.acks(201) >= acks, f"{acks} x 201")
    await w.recover_and_check()


# strace holds every fdatasync (SQLite's WAL sync; pending files use fsync) for 0.3 s
# before it starts: a row committed behind an answer is not durable for that long.
HOLD_SQLITE_SYNCS = (
    "strace", "-f", "-qq", "-o", "/dev/null",
    "-e", "trace=fdatasync", "-e", "inject=fdatasync:delay_enter=300000",
)  # fmt: skip


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
@pytest.mark.parametrize("clients", [16, 1])
async def test_forwarding_cut_between_the_201_and_its_outcome_row(world_factory, clients) -> None:
    """The "forwarded" row is committed behind the 201; only its intent is durable
    before the order leaves. A cut while the outcome rows wait for their sync: every
    201'd serial must still be found after the restart, its retry answered 200
    duplicate with that serial, nothing created twice. With one client, orders one
    after the other, the outcome rows commit in batches of their own, with no fsync
    at all (agent.state.journal): the cut takes them unless an intent's sync did."""
    w = await world_factory(standby=False, sms=False, prefix=HOLD_SQLITE_SYNCS)
    w.start_load(orders(f"out{clients}", 60), clients=clients)
    await cut_when(w, lambda: w.ledger.acks(201) >= 8, "8 x 201")
    w.agent_prefix = []
    await w.restart()
    acked = {
        serial: key for key, (status, serial) in w.ledger.acked_at_cut.items() if status == 201
    }
    # Proof the cut fell in the window: 201'd serials with only their intent on disk.
    with contextlib.closing(
        sqlite3.connect(f"file:{w.state}/journal.sqlite3?mode=ro", uri=True)
    ) as db:
        rows = dict(
            db.execute("SELECT serial, state FROM orders WHERE state = 'forwarding'").fetchall()
        )
    intent_only = [s for s in acked if s in rows]
    assert intent_only, f"the cut missed the window: every 201'd row was durable ({len(acked)})"
    # A lookup settles each with the cluster it went to: found, with the center's order id.
    for serial, key in acked.items():
        code, doc = await w.get_json(f"/v1/orders/{serial}")
        assert code == 200, (serial, code, doc)
        assert doc["state"] == "forwarded", doc
        assert doc["order_id"] == w.primary.orders[key][0], (doc, w.primary.orders[key])
    await w.retry_everything()
    await w.drained()
    await w.check()


async def test_forwarding_cut_while_replies_in_flight(world_factory) -> None:
    """The primary has created the orders; its answers have not reached the agent."""
    w = await world_factory()
    w.primary.hold_s = 1.0
    w.start_load(orders("held", 120))
    await cut_when(w, lambda: w.creates() >= 16, "16 creates at the primary, replies held")
    await w.recover_and_check()


async def test_forwarding_cut_while_requests_in_flight(world_factory) -> None:
    """Requests reached the primary, which has not created them yet; it does after the cut."""
    w = await world_factory()
    w.primary.delay_s = 0.5
    w.start_load(orders("slow", 120))
    await cut_when(w, lambda: len(w.primary.received) >= 16, "16 requests at the primary")
    await w.recover_and_check()


# == failover: the standby takes orders ================================================


async def test_failover_standby_cut_after_acks(world_factory) -> None:
    w = await world_factory(primary=False)
    w.start_load(orders("sby", 200))
    await cut_when(w, lambda: w.ledger.acks(201) >= 30, "30 x 201 from the standby")
    await w.recover_and_check()


async def test_failover_switch_under_load(world_factory) -> None:
    """The primary dies mid-load; the agent fails over; the power goes."""
    w = await world_factory()
    w.start_load(orders("switch", 300), clients=8)
    await wait_until(lambda: w.ledger.acks(201) >= 30, 30, "30 x 201 from the primary")
    await w.primary.go_down()
    await cut_when(
        w,
        lambda: sum(w.standby.creates.values()) >= 20,
        "20 creates at the standby after the primary died",
    )
    await w.recover_and_check()


async def test_primary_timeouts_buffered_then_cut(world_factory) -> None:
    """The primary hangs past upstream.timeout_s: ambiguous, buffered; then the power goes
    (the primary finishes those creates meanwhile; only it may receive them again)."""
    w = await world_factory(upstream={"timeout_s": 1})
    w.primary.delay_s = 1.5
    w.start_load(orders("hang", 60))
    await cut_when(
        w, lambda: w.ledger.acks(202) >= 10, "10 x 202 after primary timeouts", timeout=45
    )
    await w.recover_and_check()


# == the drain: buffered orders go back to the primary ================================


async def _buffer_then_primary_up(world_factory, prefix: str, n: int, **overrides):
    w = await world_factory(
        primary=False,
        standby=False,
        buffer={"drain_rate_per_s": 60, "drain_concurrency": 4},
        **overrides,
    )
    w.start_load(orders(prefix, n))
    await w.finish_load()
    assert w.ledger.acks(202) == n, dict(w.ledger.statuses)
    await w.primary.come_up()
    return w


@REPLICATED
async def test_drain_cut_at_first_creates(world_factory) -> None:
    w = await _buffer_then_primary_up(world_factory, "dr1", 150)
    await cut_when(w, lambda: w.creates() >= 5, "5 creates by the drain")
    await w.recover_and_check()


@REPLICATED
async def test_drain_cut_mid_way_by_merged_files(world_factory) -> None:
    w = await _buffer_then_primary_up(world_factory, "dr2", 150)
    await cut_when(w, lambda: len(w.merged()) >= 60, "60 files in merged/")
    await w.recover_and_check()


async def test_drain_cut_with_new_orders_forwarded(world_factory) -> None:
    w = await _buffer_then_primary_up(world_factory, "dr3", 120)
    w.start_load(orders("dr3new", 150))
    await cut_when(w, lambda: w.creates() >= 150, "150 creates (drain + forwards)")
    await w.recover_and_check()


# == SMS notices ========================================================================


async def test_sms_cut_while_sending(world_factory) -> None:
    w = await world_factory(primary=False, standby=False)
    w.start_load(orders("sms1", 120, phone_every=1))
    await cut_when(w, lambda: len(w.sms.received) >= 10, "10 SMS at the gateway")
    await w.recover_and_check()


async def test_sms_cut_with_gateway_calls_unanswered(world_factory) -> None:
    """The gateway took the messages but has not answered: rows are "sending"."""
    w = await world_factory(primary=False, standby=False)
    w.sms.delay_s = 3.0
    w.start_load(orders("sms2", 80, phone_every=1))
    await cut_when(w, lambda: len(w.sms.received) >= 4, "4 SMS at the gateway, unanswered")
    await w.recover_and_check()


async def test_sms_cut_with_notices_queued(world_factory) -> None:
    """The gateway is down: every notice is queued when the power goes."""
    w = await world_factory(primary=False, standby=False, sms=False)
    w.start_load(orders("sms3", 120, phone_every=1))
    await cut_when(w, lambda: w.ledger.acks(202) >= 40, "40 x 202 with SMS queued")
    await w.recover_and_check()


# == inbox pick-up ======================================================================


async def test_inbox_pickup_offline_cut(world_factory) -> None:
    w = await world_factory(primary=False, standby=False)
    w.drop_inbox(orders("inb1", 120))
    await cut_when(w, lambda: len(w.pending()) >= 30, "30 inbox files moved to pending/")
    await w.recover_and_check()


async def test_inbox_pickup_forwarding_cut(world_factory) -> None:
    w = await world_factory()
    w.drop_inbox(orders("inb2", 120))
    await cut_when(w, lambda: w.creates() >= 30, "30 inbox orders created at the primary")
    await w.recover_and_check()


# == retention: merged/ expiry ==========================================================


async def test_retention_expiry_cut(world_factory) -> None:
    """buffer.retention_days may be tiny (validation: >= 0); housekeeping runs at start-up."""
    w = await _buffer_then_primary_up(world_factory, "ret", 120)
    await wait_until(lambda: len(w.merged()) == 120 and not w.pending(), 30, "full drain")
    # Shorten retention to ~0.1 s, then restart: start-up housekeeping expires merged/.
    w.overrides["buffer"] = {**w.overrides.get("buffer", {}), "retention_days": 0.000001}
    w.write_config()
    await w.power_cut()
    await w.restart()
    await cut_when(w, lambda: len(w.merged()) < 120, "merged/ expiry under way")
    await w.recover_and_check()


# == edge-recover --mode merge beside the running agent =================================


@pytest.mark.parametrize("batch", ["100", "1"])
async def test_edge_recover_beside_agent_cut(world_factory, batch: str) -> None:
    w = await _buffer_then_primary_up(world_factory, f"rec{batch}", 200)
    w.start_recover("--batch", batch, "--rate", "150", "--concurrency", "8")
    await cut_when(w, lambda: w.creates() >= 60, "60 creates by edge-recover and the drain")
    await w.recover_and_check()


# == chain verification: the ledger being written ======================================


async def test_chain_ledger_cut_while_the_verifier_writes(world_factory, tmp_path) -> None:
    """Every outage order keeps its place in the ledger; a power cut costs at most a
    recheck (a repair asked again at most once), never a step's state without a
    recheck; no order lost or created twice."""
    ds = await Downstream(host="127.0.0.5").start()
    try:
        chain = {
            "enabled": True,
            "recheck_interval_s": 0.05,
            "concurrency": 8,
            "timeout_s": 2,
            "step": chain_steps(ds, amount="/amount"),
        }
        w = await _buffer_then_primary_up(world_factory, "chn", 150, chain=chain)
        ds.centers = [w.primary, w.standby]
        await cut_when(w, lambda: len(ds.repush_calls) >= 60, "60 tracking re-pushes asked")
        ledger = w.state / "chain.sqlite3"
        on_disk = _ledger_rows(ledger, tmp_path)
        # An order and its step rows commit together: never one without the others.
        assert all(n == 3 for n in on_disk.values()), on_disk
        ds.invoice_all = True
        await w.recover_and_check()
        outage = {serial for status, serial in w.ledger.first_ack.values() if status == 202}

        async def all_verified() -> bool:
            _, doc = await w.get_json("/status")
            return bool(doc) and all(
                doc["chain"][step]["verified"] == len(outage) for step in ("logistics", "invoice")
            )

        try:
            await wait_until(all_verified, 60, "every outage order's steps verified")
        except AssertionError:
            _, doc = await w.get_json("/status")
            import sqlite3

            conn = sqlite3.connect(ledger)
            bad = conn.execute(
                "SELECT s.serial, s.step, s.detail, o.order_id, o.source FROM steps s "
                "JOIN orders o USING (serial) WHERE s.state != 'verified'"
            ).fetchall()
            conn.close()
            merged = w.spool / "merged"
            copies = {r[0]: (merged / f"{r[0]}.json").read_bytes()[-200:] for r in bad[:2]}
            raise AssertionError(
                f"{len(outage)} outage orders; {doc and doc['chain']}; {bad[:6]}; {copies}"
            ) from None
        assert set(_ledger_rows(ledger, tmp_path)) == outage  # each kept or found its place
        assert max(ds.repush_calls.values()) <= 2, ds.repush_calls  # at most a recheck lost
    finally:
        await ds.stop()


def _ledger_rows(path: os.PathLike[str], tmp: os.PathLike[str]) -> dict[str, int]:
    """serial -> its step rows, read from a copy (the ledger and its WAL, as on disk)."""
    import shutil
    import sqlite3
    from pathlib import Path

    copy = Path(tmp) / f"ledger-{os.urandom(4).hex()}"
    copy.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{path}{suffix}").exists():
            shutil.copy(f"{path}{suffix}", copy / f"chain.sqlite3{suffix}")
    conn = sqlite3.connect(copy / "chain.sqlite3")
    try:
        rows = conn.execute(
            "SELECT o.serial, COUNT(s.step) FROM orders o LEFT JOIN steps s USING (serial) "
            "GROUP BY o.serial"
        ).fetchall()
    finally:
        conn.close()
    return {str(serial): int(n) for serial, n in rows}


# == serials and start-up ===============================================================


@REPLICATED
async def test_two_cuts_in_a_row(world_factory) -> None:
    """Cut, restart, new orders (a new serial block), cut again."""
    w = await world_factory(primary=False, standby=False)
    w.start_load(orders("twoa", 100))
    await cut_when(w, lambda: w.ledger.acks(202) >= 30, "30 x 202")
    await w.start_agent()
    w.start_load(orders("twob", 100))
    await cut_when(w, lambda: w.ledger.acks(202) >= 60, "30 more x 202 after the restart")
    await w.recover_and_check()


@REPLICATED
async def test_cut_during_startup_reconcile(world_factory) -> None:
    """A cut, then a second cut as soon as the restarted agent listens (reconcile done,
    the journal re-indexed from the files only in unsynced WAL frames)."""
    w = await world_factory(primary=False, standby=False)
    w.start_load(orders("boot", 150))
    await cut_when(w, lambda: w.ledger.acks(202) >= 100, "100 x 202")
    w.agent = Proc([sys.executable, "-m", "agent", "run", "--config", str(w.config)], w.agent_log)
    await cut_when(w, lambda: w.get_status("/healthz"), "the restarted agent listening")
    await w.recover_and_check()


# == LazyFS crash faults at chosen syscalls ==============================================


PENDING_TMP_FSYNCED = "lazyfs::crash::timing=after::op=fsync::from_rgx=.*/pending/\\..*\\.tmp"


@pytest.mark.parametrize(
    "spec,primary,sms,replica_cluster",
    [
        # right after the fsync of a pending temp file, before its rename
        (PENDING_TMP_FSYNCED, False, True, False),
        (PENDING_TMP_FSYNCED, False, True, True),  # with [replication] on
        # in the middle of a journal commit (a write to its WAL: the next order's intent row)
        (
            "lazyfs::crash::timing=before::op=write::from_rgx=.*/journal\\.sqlite3-wal",
            True,
            True,
            False,
        ),
        # right after the outbox commit that moves a notice to "sending" (its WAL fsync)
        (
            "lazyfs::crash::timing=after::op=fsync::from_rgx=.*/outbox\\.sqlite3-wal",
            False,
            False,
            False,
        ),
    ],
    ids=[
        "pending-tmp-fsynced",
        "pending-tmp-fsynced-replicated",
        "journal-commit",
        "outbox-sending-commit",
    ],
    indirect=["replica_cluster"],
)
async def test_crash_fault(
    world_factory, lazyfs: LazyFs, spec: str, primary: bool, sms: bool
) -> None:
    """40 orders acknowledged first; then the fault is armed and 80 more are sent: LazyFS
    kills itself at the chosen syscall, losing everything not fsync'd."""
    w = await world_factory(primary=primary, standby=False, sms=sms)
    w.start_load(orders("before", 40, phone_every=1))
    await w.finish_load()
    lazyfs.crash_fault(spec)
    if not sms:  # the notices queued so far go to "sending" now: the fault fires there
        await w.sms.come_up()
    w.start_load(orders("crash", 80, phone_every=1))
    await wait_until(lazyfs.fault_fired, 30, "the LazyFS crash fault to fire")
    await _after_crash_fault(w, lazyfs)


async def test_torn_write_of_a_pending_file() -> None:
    """torn-op: only the first half of a pending temp file's write persists, then LazyFS
    dies. torn-op names the file by its full path in a < 100-byte FIFO command, so this
    test has its own mount with the shortest paths and node_id "p" (short serials)."""
    fs = LazyFs(build(), short=True)
    fs.mount()
    w = World(fs, "torn-write", spool_at_mount=True, agent={"node_id": "p"})
    try:
        await w.start(primary=False, standby=False)
        w.start_load(orders("before", 20))
        await w.finish_load()
        assert w.ledger.acks(202) == 20, dict(w.ledger.statuses)
        first = f"P-{datetime.now(UTC):%Y%m%d}-{21:09d}"  # the next serial of the block
        fs.crash_fault(
            f"lazyfs::torn-op::file={fs.root}/pending/.{first}.json.tmp::parts=2::persist=1"
        )
        w.start_load(orders("torn", 60))
        await wait_until(fs.fault_fired, 30, "the torn write to crash LazyFS")
        await _after_crash_fault(w, fs)
    finally:
        await w.close()
        fs.destroy()


async def _after_crash_fault(w: World, lazyfs: LazyFs) -> None:
    w.cuts += 1
    if w.agent is not None:
        w.agent.kill()
    await w.finish_load(30)
    w.ledger.acked_at_cut = dict(w.ledger.first_ack)
    await asyncio.to_thread(lazyfs.remount)
    await w.survey()
    await w.recover_and_check()


# == a disk that fails under the running agent ===========================================


@pytest.mark.parametrize("primary", [False, True], ids=["offline", "primary-up"])
async def test_broken_disk_answers_json_503_and_not_ready(
    world_factory, lazyfs: LazyFs, primary: bool
) -> None:
    """After a crash fault every syscall on the mount fails (ENOTCONN): POST /v1/orders
    must answer a JSON 503 (not accepted, retry), never a 2xx nor a plain-text 500, and
    /readyz must say 503."""
    w = await world_factory(primary=primary, standby=False)
    w.start_load(orders("pre", 20))
    await w.finish_load()
    lazyfs.crash_fault("lazyfs::crash::timing=before::op=create::from_rgx=.*/pull-the-plug")
    try:
        with open(lazyfs.mnt / "pull-the-plug", "wb"):
            pass
    except OSError as exc:
        assert exc.errno in (errno.ECONNABORTED, errno.ENOTCONN), exc
    await wait_until(lazyfs.fault_fired, 10, "LazyFS to crash")
    answers = []
    for i in range(5):
        key = f"pl:broken-{i}"
        raw = orjson.dumps({"channel_id": "pl", "channel_order_id": f"broken-{i}"})
        w.ledger.bodies[key] = raw
        status, body = await w.post(key, raw)
        answers.append((status, body))
    ready = await w.get_status("/readyz")
    for status, body in answers:
        if status != 503 or not isinstance(body, dict) or "error" not in body:
            w.violations.append(
                f"disk broken (ENOTCONN): POST /v1/orders -> {status} "
                f"{str(body)[:100]!r}, expected a JSON 503"
            )
    if ready != 503:
        w.violations.append(f"disk broken (ENOTCONN): GET /readyz -> {ready}, expected 503")
    # then the operator fixes the disk: remount, restart; nothing acknowledged is lost.
    # World.check() reports the answers above together with what the cut broke.
    await _after_crash_fault(w, lazyfs)


# == replication: the server lost with its disk, and its return ========================


@ONLY_REPLICATED
@pytest.mark.parametrize("nats_fault", ["none", "two-followers-down"])
async def test_server_lost_after_the_cut_taken_over_from_the_replica(
    world_factory, replica_cluster: NatsCluster, nats_fault: str
) -> None:
    """The cut, then the server is lost: its state_dir and buffer deleted, as if the disk
    died with the power. Another machine's ``edge-recover --from-replica NODE --mode
    merge`` delivers every order the lost server answered 202 exactly once.
    ``two-followers-down``: the two NATS nodes that do not lead the stream die first and
    orders keep coming (each must get a 503, never a 202 the replica does not hold); they
    come back after the cut, before the takeover."""
    w = await world_factory(primary=False, standby=False)
    assert w.replica is not None
    w.start_load(orders("lost", 300))
    await wait_until(lambda: w.ledger.acks(202) >= 25, 30, "25 x 202")
    if nats_fault == "two-followers-down":
        for node in await w.replica.followers():
            replica_cluster.kill(node)
        answered = sum(w.ledger.statuses.values())
        await cut_when(
            w,
            lambda: sum(w.ledger.statuses.values()) >= answered + 32,
            "32 answers with two NATS followers down",
        )  # the cut's checks bring them back first: reading the replica needs a quorum
    else:
        await cut_when(w, lambda: w.ledger.acks(202) >= 60, "60 x 202")
    await asyncio.to_thread(_rmtree, w.state)  # the disk died with the power
    await asyncio.to_thread(_rmtree, w.spool)
    await w.primary.come_up()
    await w.replica.take_over(w)
    w.notes.append(f"answers before the cut: {dict(w.ledger.statuses)}")
    w.raise_violations()
    # "A refused order must never reach the center later" (issue 22): the 503 follows a
    # publish that timed out without a quorum, and JetStream may still commit it once
    # the nodes return. A running agent then writes a 'withdrawn' tombstone over it
    # (test_replication.py::test_a_refused_order_the_leader_kept_is_withdrawn_in_the_replica);
    # a server lost before the quorum returned cannot, and the takeover creates the
    # order: once (a client's retry with the same key is the same order), but created.
    # The residual is documented in docs/replication.md.
    refused = [k for k, status in w.ledger.last.items() if status == 503]
    created = [k for k in refused if w.creates_of(k)]
    assert all(w.creates_of(k) == 1 for k in created), created
    if created:
        pytest.xfail(
            f"{len(created)} of {len(refused)} orders answered 503 (not accepted: no "
            f"quorum) were created by the takeover: {created[:3]}"
        )


@ONLY_REPLICATED
async def test_returning_server_cut_while_it_moves_what_a_takeover_delivered(
    world_factory,
) -> None:
    """The server goes dark with 120 orders buffered; another machine takes them over
    from the replica; the server comes back (its disk was fine) and the power goes again
    while it moves the delivered orders to merged/ unsent. After the restart nothing of
    it reaches the center again, and every retry is answered with its first serial."""
    w = await world_factory(primary=False, standby=False)
    assert w.replica is not None
    w.start_load(orders("back", 120))
    await w.finish_load()
    assert w.ledger.acks(202) == 120, dict(w.ledger.statuses)
    await w.power_cut()
    await w.primary.come_up()
    await w.replica.take_over(w)
    sent = len(w.primary.received)
    w.agent = Proc([sys.executable, "-m", "agent", "run", "--config", str(w.config)], w.agent_log)
    await cut_when(w, lambda: len(w.merged()) >= 30, "30 delivered orders moved to merged/")
    moved_at_cut = len(w.merged())
    assert moved_at_cut < 120, "the cut missed the window: every order was moved already"
    await w.restart()
    await w.retry_everything()
    await w.drained()
    if len(w.primary.received) != sent:
        w.violations.append(
            f"the returning server sent {len(w.primary.received) - sent} orders a takeover "
            "had delivered"
        )
    w.notes.append(f"merged/ at the second cut: {moved_at_cut} of 120")
    await w.check()
