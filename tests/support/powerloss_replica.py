"""The replica's view in the power-loss suite: the same cuts with ``[replication]`` on.

The cut is the agent's server losing power; the three nats-server nodes stand for the
other warehouse servers and survive it (their store is on a normal disk, never on the
LazyFS mount). Besides the suite's own checks (tests/support/powerloss_harness.py),
a world with a ``ReplicaView`` checks what the replica says (issue 22, CONTRACT 11):

- right after each cut: every order answered 202 is in the replica, with its key and
  body (a 202 is sent only once JetStream stored the record on a quorum);
- after the restarted agent drained: the replica never says pending (or pinned) for an
  order the center created, and its ``delivered`` carries the center's order id
  (polled with a deadline: a change the replica could not take at once is retried by
  the agent), and a takeover agrees: ``edge-recover --from-replica NODE --mode
  dry-run`` finds nothing to send and ``--mode verify`` finds every delivered order at
  the center with its body;
- ``take_over``: the server is gone with its disk (state_dir and buffer
  deleted) and another machine's ``--mode merge`` delivers every 202'd order exactly
  once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import orjson
from nats.errors import Error as NatsError
from nats.js.api import StreamInfo

from agent.drill.agent_proc import config_text
from agent.errors import ReplicaError
from agent.replica.stream import DELIVERED, STREAM, UNDELIVERED, Change
from agent.sandbox.nats_cluster import NatsCluster, NatsNode, quiet_errors, read_replica
from tests.support.harness import wait_for
from tests.support.recover_helpers import Run, recover

if TYPE_CHECKING:
    from tests.support.powerloss_harness import World

# The restarted agent writes ``delivered`` before each local move and retries what the
# replica could not take every second; this is how long the suite waits for it.
SETTLE_S = 30.0


class ReplicaView:
    """One world's node in a NATS cluster shared by the module (node ids keep them apart)."""

    def __init__(self, cluster: NatsCluster, node_id: str) -> None:
        self.cluster = cluster
        self.node_id = node_id

    def section(self) -> dict[str, Any]:
        """The agent's ``[replication]``: required, so no 202 without a quorum."""
        return {
            "enabled": True,
            "servers": self.cluster.urls,
            "replicas": 3,
            "required": True,
            "timeout_s": 2,
        }

    async def read(self, timeout: float = 30) -> dict[str, Change]:
        """Every order of this node in the replica (retried while JetStream elects leaders)."""

        async def listing() -> dict[str, Change] | None:
            try:
                return await read_replica(self.cluster.urls, self.node_id)
            except ReplicaError:
                return None

        found: dict[str, Change] = await wait_for(
            listing, timeout, f"the replica listing of {self.node_id}", interval=0.3
        )
        return found

    # -- after a cut -----------------------------------------------------------------

    async def nodes_back(self) -> None:
        """NATS nodes a scenario killed come back (on their stores), and the stream has
        a leader and every replica current again: what an operator checks (``nats
        stream info EDGE_BUFFER``) before a takeover. A takeover run in the seconds
        before that merges, but its marks are refused ("no response from stream")."""
        if all(node.running for node in self.cluster.nodes):
            return
        self.cluster.start()
        await self.cluster.wait_ready(60)
        await wait_for(self._stream_current, 60, f"stream {STREAM} current", interval=0.3)

    async def _stream_info(self) -> StreamInfo | None:
        try:
            nc = await nats.connect(
                servers=[n.url for n in self.cluster.nodes if n.running],
                connect_timeout=1,
                allow_reconnect=False,
                error_cb=quiet_errors,
            )
        except (NatsError, OSError, TimeoutError):
            return None
        try:
            return await nc.jetstream(timeout=2).stream_info(STREAM)
        except (NatsError, TimeoutError):
            return None
        finally:
            await nc.close()

    async def followers(self) -> list[NatsNode]:
        """The nodes that are not the stream's leader (once it has one)."""

        async def leader() -> str | None:
            info = await self._stream_info()
            return info.cluster.leader if info and info.cluster else None

        name = await wait_for(leader, 30, f"a leader of stream {STREAM}", interval=0.3)
        return [n for n in self.cluster.nodes if n.name != name]

    async def _stream_current(self) -> bool:
        info = await self._stream_info()
        if info is None or info.cluster is None:
            return False
        peers = info.cluster.replicas or []
        return bool(
            info.cluster.leader
            and len(peers) == len(self.cluster.nodes) - 1
            and all(p.current and not p.offline for p in peers)
        )

    async def after_cut(self, w: World) -> None:
        """Every 202 answered before the cut is in the replica, as the client sent it
        (read once the NATS nodes a scenario killed are back: it needs a quorum)."""
        await self.nodes_back()
        held = await self.read()
        missing = []
        for key, (status, serial) in w.ledger.acked_at_cut.items():
            if status != 202:
                continue
            change = held.get(serial)
            if change is None:
                missing.append(f"{serial} ({key}): not in the replica")
            elif (change.record.dedupe_key, change.record.body.encode()) != (
                key,
                w.ledger.bodies[key],
            ):
                missing.append(f"{serial} ({key}): the replica holds {change.record.dedupe_key}")
        if missing:
            w.violations.append(
                f"cut #{w.cuts}: {len(missing)} orders answered 202 are not in the replica "
                f"(of {len(held)} records): {missing[:6]}"
            )
        w.notes.append(f"cut #{w.cuts}: replica holds {len(held)} records of {self.node_id}")

    # -- after the drain -------------------------------------------------------------

    async def after_drain(self, w: World) -> None:
        """The replica agrees with the center, and a takeover finds nothing to send."""
        stale = await self._settled(w)
        if stale:
            w.violations.append(
                f"the replica still says an order is undelivered, or lacks the center's "
                f"order id, {SETTLE_S:.0f}s after the drain ({len(stale)}): {stale[:6]}"
            )
            return  # a takeover would disagree for the same reason
        await self._takeover_agrees(w)

    async def _settled(self, w: World) -> list[str]:
        """Poll until every record of this node says delivered with the center's order
        id and every 202'd serial is there; what is still wrong at the deadline."""
        wrong: list[str] = []

        async def agrees() -> bool:
            wrong[:] = []
            try:
                held = await read_replica(self.cluster.urls, self.node_id)
            except ReplicaError as exc:
                wrong[:] = [f"replica unreadable: {exc}"]
                return False
            for serial, change in held.items():
                key = change.record.dedupe_key
                order_id = _center_order_id(w, key)
                if change.state in UNDELIVERED:
                    created = "created at the center" if order_id else "never created"
                    wrong.append(f"{serial} ({key}) {change.state}, {created}")
                elif change.state == DELIVERED and change.order_id != order_id:
                    wrong.append(
                        f"{serial} ({key}) delivered with order_id {change.order_id!r}, "
                        f"the center has {order_id!r}"
                    )
            for key, (status, serial) in w.ledger.first_ack.items():
                if status == 202 and serial not in held:
                    wrong.append(f"{serial} ({key}): answered 202, not in the replica")
            return not wrong

        with contextlib.suppress(AssertionError):
            await wait_for(agrees, SETTLE_S, "the replica to agree with the center", interval=0.3)
        return wrong

    async def _takeover_agrees(self, w: World) -> None:
        config = self.other_machine(w)
        report = w.logs / f"takeover-dry-run-{w.cuts}.json"
        dry, verify = await asyncio.gather(
            self.recover(w, config, "dry-run", "--report", str(report)),
            self.recover(w, config, "verify"),
        )
        summary = _summary(report)
        if dry.code != 0 or summary.get("files") != 0 or summary.get("to_send") != 0:
            w.violations.append(
                f"edge-recover --from-replica {self.node_id} --mode dry-run after the drain: "
                f"exit {dry.code}, files {summary.get('files')}, to send "
                f"{summary.get('to_send')} (expected 0 and 0): {dry.err.strip()[-300:]}"
            )
        if verify.code != 0:
            w.violations.append(
                f"edge-recover --from-replica {self.node_id} --mode verify after the drain: "
                f"exit {verify.code}: {(verify.out + verify.err).strip()[-400:]}"
            )

    # -- the server lost with its disk ------------------------------------------------

    def other_machine(self, w: World) -> Path:
        """Another warehouse server's config: same clusters and replica, its own node."""
        other = w.logs / "other-machine"
        other.mkdir(parents=True, exist_ok=True)
        cfg = {
            "agent": {"node_id": "wh-pl-other", "state_dir": str(other / "state")},
            "buffer": {"path": str(other / "spool")},
            "upstream": {"primary": w.primary.url, "standby": w.standby.url, "timeout_s": 2},
            "auth": {"tokens_file": ""},
            "replication": self.section(),
        }
        path = other / "agent.toml"
        path.write_text(config_text(cfg) + "\n")
        return path

    async def recover(self, w: World, config: Path, mode: str, *extra: str) -> Run:
        """``edge-recover --from-replica NODE --mode MODE`` on the other machine."""
        run = await recover(
            "--from-replica", self.node_id, "--mode", mode, "--config", str(config), *extra
        )
        log = w.logs / f"takeover-{mode}.log"
        with open(log, "a") as fh:
            fh.write(f"== exit {run.code}\n{run.out}{run.err}")
        return run

    async def take_over(self, w: World) -> None:
        """Another machine takes the server's orders over from the replica (merge): each
        order answered 202 created exactly once; a second run sends nothing; the replica
        says delivered with the center's order id; verify passes."""
        config = self.other_machine(w)
        await self.read(60)  # JetStream answers again (after a node came back, say)
        report = w.logs / "takeover-merge.json"
        run = await self.recover(w, config, "merge", "--report", str(report))
        w.notes.append(f"takeover: {run.err.strip()[-600:]}")
        if run.code != 0:
            w.violations.append(
                f"takeover merge exit {run.code}: {run.err.strip()[-400:]}; "
                f"summary {_summary(report)}"
            )
        sent = len(w.primary.received)
        again = await self.recover(w, config, "merge")
        w.notes.append(f"takeover again: {again.err.strip()[-300:]}")
        if again.code != 0 or len(w.primary.received) != sent:
            w.violations.append(
                f"a second takeover run (exit {again.code}) sent "
                f"{len(w.primary.received) - sent} orders again"
            )
        led = w.ledger
        twice = {k: n for k in led.bodies if (n := w.creates_of(k)) > 1}
        lost = [
            f"{serial} ({key})"
            for key, (status, serial) in led.acked_at_cut.items()
            if status == 202 and w.creates_of(key) != 1
        ]
        if twice:
            w.violations.append(f"{len(twice)} orders created more than once: {twice}")
        if lost:
            w.violations.append(
                f"{len(lost)} of {led.acks(202)} orders answered 202 by the lost server "
                f"not created by the takeover: {lost[:6]}"
            )
        stale = await self._settled(w)
        if stale:
            w.violations.append(f"the replica after the takeover: {stale[:6]}")
        verify = await self.recover(w, config, "verify")
        if verify.code != 0:
            w.violations.append(f"takeover verify exit {verify.code}: {verify.err[-300:]}")


def _center_order_id(w: World, key: str) -> str | None:
    for cluster in (w.primary, w.standby):
        if key in cluster.orders:
            return cluster.orders[key][0]
    return None


def _summary(report: Path) -> dict[str, Any]:
    try:
        doc = orjson.loads(report.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    summary = doc.get("summary") if isinstance(doc, dict) else None
    return summary if isinstance(summary, dict) else {}


def fresh_node_id() -> str:
    """A node id of its own per world: worlds share the module's NATS cluster."""
    return f"plr-{os.urandom(4).hex()}"
