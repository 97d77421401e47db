"""The power-loss world: the real agent on a LazyFS mount, two clusters, an SMS gateway,
16 clients, and the checks a user would make after the power comes back.

Everything the agent writes (buffer.path, agent.state_dir) lives on the LazyFS mount;
its log and config live outside it (a log is not what we are testing). The clusters
are real aiohttp servers on 127.0.0.2 (primary) and 127.0.0.3 (standby), each with its
OWN idempotency store and created-per-key counter, so a key created on both shows up
as created twice. The SMS gateway (127.0.0.4) counts messages per serial.

A cut: SIGKILL every process of ours (agent, edge-recover), ``lazyfs::clear-cache``
(only what was fsync'd survives), look at the disk, restart the agent on the same
config, bring the clusters back, let clients retry what was not acknowledged (same
body, same key, until a 2xx), let the buffer drain, then check the promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from agent.drill.agent_proc import config_text
from agent.sandbox.servers import SandboxCenter, SandboxSmsGateway, free_port
from tests.support.harness import wait_for
from tests.support.powerloss_fs import REPO, LazyFs, drop_durably

if TYPE_CHECKING:
    from tests.support.powerloss_replica import ReplicaView

NODE_ID = "wh-pl-01"
CLIENTS = 16
ACKED = frozenset({200, 201, 202})
TRY_AGAIN = frozenset({409, 503, 507})  # not accepted: a channel retries these


@dataclass
class Cluster(SandboxCenter):
    """A SandboxCenter that can also hold its answer after creating (reply in flight)."""

    hold_s: float = 0.0

    async def _post(self, request: web.Request) -> web.Response:
        resp = await super()._post(request)
        if self.hold_s:
            await asyncio.sleep(self.hold_s)
        return resp

    async def come_up(self) -> None:
        self.hold_s = 0.0
        await super().come_up()


wait_until = wait_for  # one polling helper for the whole suite (tests/conftest.py)


def order_files(directory: Path) -> list[str]:
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        n
        for n in names
        if n.endswith(".json") and not n.startswith(".") and not n.endswith(".reason.json")
    )


class Proc:
    """A subprocess of ours (the agent, edge-recover), in its own process group."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            stdout=self._fh,
            stderr=self._fh,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group (power loss spares nothing) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - D state on a dead FUSE
            self.proc.kill()
        self._fh.close()


@dataclass
class Ledger:
    """What the clients saw: every reply, the first 2xx per key, serials per key."""

    bodies: dict[str, bytes] = field(default_factory=dict)
    first_ack: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (status, S)
    serial_keys: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    statuses: Counter[str] = field(default_factory=Counter)
    acked_at_cut: dict[str, tuple[int, str]] = field(default_factory=dict)
    inbox_keys: set[str] = field(default_factory=set)
    last: dict[str, int | None] = field(default_factory=dict)  # key -> its latest answer

    def note(self, key: str, status: int | None, body: Any) -> None:
        self.statuses[str(status)] += 1
        self.last[key] = status
        if status in ACKED and isinstance(body, dict) and body.get("serial"):
            serial = str(body["serial"])
            self.serial_keys[serial].add(key)
            self.first_ack.setdefault(key, (status, serial))

    def acks(self, status: int | None = None) -> int:
        return sum(1 for s, _ in self.first_ack.values() if status is None or s == status)


def orders(prefix: str, n: int, phone_every: int = 3) -> dict[str, bytes]:
    """dedupe key -> raw body; every ``phone_every``-th order has a customer phone."""
    out = {}
    for i in range(n):
        doc: dict[str, Any] = {
            "channel_id": "pl",
            "channel_order_id": f"{prefix}-{i}",
            "amount": "199.10",
            "items": [{"sku": "A-1", "qty": 2}],
        }
        if phone_every and i % phone_every == 0:
            doc["customer_phone"] = f"139{i % 100_000_000:08d}"
        out[f"pl:{prefix}-{i}"] = orjson.dumps(doc)
    return out


class World:
    """One scenario's agent, neighbours, clients and disk, on a shared LazyFS mount."""

    def __init__(
        self, fs: LazyFs, name: str, spool_at_mount: bool = False, **overrides: dict[str, Any]
    ) -> None:
        self.fs = fs
        self.name = name
        self.dir = fs.mnt / name
        self.spool = fs.mnt if spool_at_mount else self.dir / "spool"
        self.state = self.dir / "state"
        self.logs = fs.base / "logs" / name
        self.config = self.logs / "agent.toml"
        self.agent_log = self.logs / "agent.log"
        self.primary = Cluster(host="127.0.0.2", name="primary")
        self.standby = Cluster(host="127.0.0.3", name="standby")
        self.sms = SandboxSmsGateway(host="127.0.0.4")
        self.overrides = overrides
        self.node_id = str(overrides.get("agent", {}).get("node_id", NODE_ID))
        self.agent: Proc | None = None
        self.agent_prefix: list[str] = []  # e.g. strace ... (tests/system/test_fsync_order.py)
        self.recovers: list[Proc] = []
        self.ledger = Ledger()
        self.session: aiohttp.ClientSession | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.load_task: asyncio.Task[None] | None = None
        self.cuts = 0
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.after_cut: list[dict[str, Any]] = []
        self.where_after_cut: dict[str, str] = {}
        self.last_usage: float | None = None  # serial -> directory after the last cut
        # With [replication]: the replica's view, checked after each cut and the drain.
        self.replica: ReplicaView | None = None

    # -- set-up / tear-down ---------------------------------------------------------------

    async def start(self, primary: bool = True, standby: bool = True, sms: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for c in (self.primary, self.standby, self.sms):
            await c.start()
        if not primary:
            await self.primary.go_down()
        if not standby:
            await self.standby.go_down()
        if not sms:
            await self.sms.go_down()
        self.write_config()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, force_close=False),
            timeout=aiohttp.ClientTimeout(total=20),
        )
        await self.start_agent()
        await self.settle()

    def write_config(self) -> None:
        cfg: dict[str, dict[str, Any]] = {
            "agent": {
                "node_id": self.node_id,
                "listen": f"127.0.0.1:{self.port}",
                "state_dir": str(self.state),
                "shutdown_timeout_s": 2,
            },
            "buffer": {
                "path": str(self.spool),
                "scan_interval_s": 1,
                "drain_rate_per_s": 1000,
                "drain_concurrency": 8,
            },
            "upstream": {"primary": self.primary.url, "standby": self.standby.url, "timeout_s": 2},
            "health": {
                "interval_s": 0.1,
                "timeout_s": 0.5,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
            },
            "sms": {
                "provider": "http",
                "url": self.sms.url,
                "retry_initial_s": 0.2,
                "retry_max_s": 0.5,
                "timeout_s": 2,
                "per_phone_per_hour": 0,
            },
            "auth": {"tokens_file": ""},
        }
        if self.replica is not None:
            cfg["replication"] = self.replica.section()
        for section, values in self.overrides.items():
            cfg.setdefault(section, {}).update(values)
        self.config.write_text(config_text(cfg) + "\n")  # [[chain.step]] tables too

    async def start_agent(self, ready_timeout: float = 30) -> None:
        self.agent = Proc(
            [
                *self.agent_prefix,
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(self.config),
            ],
            self.agent_log,
        )
        agent = self.agent

        async def ready() -> bool:
            if not agent.running():
                raise AssertionError(
                    f"[{self.name}] the agent exited {agent.proc.returncode} at start-up "
                    f"(cut #{self.cuts}); it must start by itself whatever state the disk "
                    f"was left in. Log tail:\n{self.log_tail()}"
                )
            return await self.get_status("/readyz") == 200

        try:
            await wait_until(
                ready,
                ready_timeout,
                f"[{self.name}] agent /readyz after cut #{self.cuts}",
                interval=0.05,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nagent log tail:\n{self.log_tail()}") from None

    async def get_status(self, path: str) -> int | None:
        assert self.session is not None
        try:
            async with self.session.get(
                f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=3)
            ) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def get_json(self, path: str) -> tuple[int | None, Any]:
        assert self.session is not None
        try:
            async with self.session.get(
                f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                data = await r.read()
                try:
                    return r.status, orjson.loads(data)
                except orjson.JSONDecodeError:
                    return r.status, data.decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, repr(exc)

    async def mode(self) -> str | None:
        status, doc = await self.get_json("/status")
        return doc.get("mode") if status == 200 and isinstance(doc, dict) else None

    async def settle(self) -> None:
        """Wait until the agent sees the clusters as they are (health has caught up)."""
        up_p = self.primary._runner is not None and self.primary.mode == "up"
        up_s = self.standby._runner is not None and self.standby.mode == "up"
        want = "normal" if up_p else "standby" if up_s else "offline"

        async def right() -> bool:
            return await self.mode() == want

        await wait_until(right, 15, f"[{self.name}] agent mode {want}", interval=0.05)

    async def close(self) -> None:
        """Always: kill our processes, stop the neighbours, close the client."""
        if self.load_task is not None:
            self.load_task.cancel()
            await asyncio.gather(self.load_task, return_exceptions=True)
        for p in [*self.recovers, *([self.agent] if self.agent else [])]:
            if p.running():
                p.kill()
        for c in (self.primary, self.standby, self.sms):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.stop(), 10)
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.close(), 10)

    # -- clients -----------------------------------------------------------------------

    async def post(self, key: str, raw: bytes, timeout: float = 20) -> tuple[int | None, Any]:
        assert self.session is not None
        headers = {"Content-Type": "application/json"}
        try:
            async with self.session.post(
                f"{self.url}/v1/orders",
                data=raw,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                data = await r.read()
                try:
                    body: Any = orjson.loads(data)
                except orjson.JSONDecodeError:
                    body = data.decode(errors="replace")
                self.ledger.note(key, r.status, body)
                return r.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.ledger.note(key, None, None)
            return None, repr(exc)

    def start_load(self, bodies: dict[str, bytes], clients: int = CLIENTS) -> None:
        """Send every order once from ``clients`` concurrent clients, in the background."""
        self.ledger.bodies.update(bodies)
        queue = deque(bodies)

        async def worker() -> None:
            while queue:
                key = queue.popleft()
                await self.post(key, bodies[key])

        async def run() -> None:
            await asyncio.gather(*(worker() for _ in range(clients)))

        self.load_task = asyncio.create_task(run(), name=f"load:{self.name}")

    async def finish_load(self, timeout: float = 60) -> None:
        if self.load_task is not None:
            await asyncio.wait_for(self.load_task, timeout)
            self.load_task = None

    def drop_inbox(self, bodies: dict[str, bytes]) -> None:
        """A local producer places orders in inbox/ (durably, as it should)."""
        inbox = self.spool / "inbox"
        for i, (key, raw) in enumerate(bodies.items()):
            drop_durably(inbox, f"drop-{i:05d}.json", raw)
            self.ledger.inbox_keys.add(key)
        self.ledger.bodies.update(bodies)

    # -- edge-recover --------------------------------------------------------------------

    def start_recover(self, *extra: str) -> Proc:
        log = self.logs / f"recover-{len(self.recovers)}.log"
        p = Proc(
            [
                sys.executable,
                "-m",
                "recovery",
                "--path",
                str(self.spool),
                "--mode",
                "merge",
                "--target",
                self.primary.url,
                *extra,
            ],
            log,
        )
        self.recovers.append(p)
        return p

    # -- views ---------------------------------------------------------------------------

    def pending(self) -> list[str]:
        return order_files(self.spool / "pending")

    def merged(self) -> list[str]:
        return order_files(self.spool / "merged")

    def creates(self) -> int:
        return sum(self.primary.creates.values()) + sum(self.standby.creates.values())

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.agent_log.read_text(errors="replace")[-n:]
        except OSError:
            return "<no agent log>"

    def log_lines(self, *needles: str, limit: int = 12) -> list[str]:
        """Agent log lines containing any of ``needles``; a traceback shows as its last
        line and the frame that raised (the whole JSON line would be unreadable)."""
        try:
            lines = self.agent_log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out: list[str] = []
        for ln in lines:
            if not any(n in ln for n in needles):
                continue
            try:
                doc = orjson.loads(ln)
            except orjson.JSONDecodeError:
                out.append(ln[:400])
                continue
            exc = str(doc.get("exc", "")).strip().splitlines()
            frames = [x.strip() for x in exc if x.strip().startswith("File ")]
            ours = [f for f in frames if "/agent/" in f or "/recovery/" in f]
            frames = ours or frames
            where = f" at {frames[-1]}" if frames else ""
            short = f"{doc.get('logger')}: {str(doc.get('msg'))[:300]}"
            out.append(short + (f" -- {exc[-1]}{where}" if exc else ""))
        seen: dict[str, int] = {}
        for line in out:
            seen[line] = seen.get(line, 0) + 1
        return [f"{line} (x{n})" if n > 1 else line for line, n in seen.items()][:limit]

    # -- the cut -------------------------------------------------------------------------

    async def power_cut(self) -> None:
        """Power loss: every process of ours dies, then every unsynced byte is gone."""
        self.cuts += 1
        for p in [*self.recovers, *([self.agent] if self.agent else [])]:
            if p.running():
                p.kill()
        self.recovers.clear()
        if self.load_task is not None:  # the clients see connection errors now
            await self.finish_load(30)
        self.ledger.acked_at_cut = dict(self.ledger.first_ack)
        usage = self.last_usage = self.fs.cache_usage_pct()
        assert usage < 50, (
            f"LazyFS cache {usage}% full before the clear-cache: unsynced "
            "data would survive for the wrong reason; lower the load"
        )
        self.fs.clear_cache()
        await self.survey()

    async def survey(self) -> None:
        """After a cut: what the disk kept (and, replicated, what the replica holds)."""
        self.after_cut.append(self.inspect_disk())
        if self.replica is not None:
            await self.replica.after_cut(self)

    def inspect_disk(self) -> dict[str, Any]:
        """What survived on disk: every acknowledged 202 must be in pending/ or merged/."""
        pend_dir, merged_dir = self.spool / "pending", self.spool / "merged"
        unparsable = {}
        for name in self.pending():
            try:
                doc = orjson.loads((pend_dir / name).read_bytes())
                if not isinstance(doc, dict) or "body" not in doc:
                    raise ValueError("not a record")
            except (ValueError, OSError) as exc:
                unparsable[name] = repr(exc)[:120]
        lost = []
        for key, (status, serial) in self.ledger.first_ack.items():
            if status != 202:
                continue
            name = f"{serial}.json"
            path = pend_dir / name
            if path.exists():
                try:
                    doc = orjson.loads(path.read_bytes())
                    if doc.get("body", "").encode() != self.ledger.bodies[key]:
                        lost.append(f"{serial} ({key}): pending file has another body")
                except (ValueError, OSError) as exc:
                    lost.append(
                        f"{serial} ({key}): pending file unreadable after the cut: {exc!r:.80}"
                    )
            elif not (merged_dir / name).exists() and self.creates_of(key) == 0:
                lost.append(
                    f"{serial} ({key}): acknowledged 202, no file in pending/ or "
                    "merged/ after the cut, not at any cluster"
                )
        self.where_after_cut = {
            n.removesuffix(".json"): d
            for d in ("merged", "rejected", "pending")
            for n in order_files(self.spool / d)
        }
        if lost:
            self.violations.append(
                f"cut #{self.cuts}: {len(lost)} acknowledged buffered "
                f"orders not on disk: {lost[:8]}"
            )
        return {
            "pending": len(self.pending()),
            "merged": len(self.merged()),
            "unparsable": unparsable,
            "cache_pct_before_clear": self.last_usage,
        }

    def creates_of(self, key: str) -> int:
        return self.primary.creates[key] + self.standby.creates[key]

    async def restart(self, all_up: bool = True) -> None:
        """Restart the agent on the same config; bring the neighbours back."""
        if all_up:
            await self.primary.come_up()
            await self.standby.come_up()
            await self.sms.come_up()
            self.sms.delay_s = 0.0
        await self.start_agent()
        if all_up:
            await self.settle()

    # -- after the cut -------------------------------------------------------------------

    async def retry_everything(self, timeout: float = 60) -> None:
        """Clients retry: acknowledged orders once (must be 200 duplicate with the first
        serial), the others until they get a 2xx (same body, same key)."""
        acked = dict(self.ledger.acked_at_cut)
        wrong: list[str] = []
        deadline = time.monotonic() + timeout
        sem = asyncio.Semaphore(CLIENTS)

        async def until_answer(key: str) -> tuple[int | None, Any]:
            while True:
                status, body = await self.post(key, self.ledger.bodies[key])
                if status not in TRY_AGAIN and status is not None:
                    return status, body
                if time.monotonic() > deadline:
                    return status, body
                await asyncio.sleep(0.1)

        async def retry_acked(key: str) -> None:
            async with sem:
                status, body = await until_answer(key)
            first = acked[key][1]
            ok = (
                status == 200
                and isinstance(body, dict)
                and body.get("status") == "duplicate"
                and body.get("serial") == first
            )
            if not ok:
                where = self.where_after_cut.get(first, "no file")
                wrong.append(
                    f"{key} first {acked[key][0]} {first} ({where} after the cut) "
                    f"-> retry got {status} "
                    f"{orjson.dumps(body).decode()[:160] if body else body}"
                )

        async def retry_unacked(key: str) -> None:
            async with sem:
                await until_answer(key)

        client_keys = [k for k in self.ledger.bodies if k not in self.ledger.inbox_keys]
        await asyncio.gather(
            *(retry_acked(k) for k in client_keys if k in acked),
            *(retry_unacked(k) for k in client_keys if k not in acked),
        )
        never = [k for k in client_keys if k not in self.ledger.first_ack]
        if never:
            self.violations.append(
                f"{len(never)} orders never got a 2xx after the restart "
                f"(retried for {timeout}s): {never[:5]}"
            )
        if wrong:
            places = Counter(w.split("(", 1)[1].split(" after", 1)[0] for w in wrong)
            self.violations.append(
                f"retried acknowledged orders that went wrong, by where "
                f"their file was after the cut: {dict(places)}"
            )
            self.violations.append(
                f"{len(wrong)} of {len(acked)} acknowledged orders, retried after the cut, did "
                f"not get 200 duplicate with their first serial: {wrong[:6]}"
            )

    async def drained(self, timeout: float = 60) -> None:
        """The agent delivers every buffered order and takes every inbox file."""
        keys = set(self.ledger.bodies)

        def done() -> bool:
            return (
                not self.pending()
                and not order_files(self.spool / "inbox")
                and all(self.creates_of(k) for k in keys)
            )

        try:
            await wait_until(done, timeout, "the buffer to drain", interval=0.1)
        except AssertionError:
            missing = [k for k in keys if not self.creates_of(k)]
            self.violations.append(
                f"not drained after {timeout}s: pending/ {len(self.pending())}, inbox/ "
                f"{len(order_files(self.spool / 'inbox'))}, {len(missing)} orders at no "
                f"cluster: {missing[:5]}"
            )

    async def check(self) -> None:
        """The promise, as a user would check it; all violations in one failure."""
        led = self.ledger
        # 1. every acknowledged order created exactly once across both clusters
        twice, never = [], []
        for key in led.bodies:
            n = self.creates_of(key)
            acked = key in led.first_ack or key in led.inbox_keys
            if n > 1:
                twice.append(
                    f"{key}: primary {self.primary.creates[key]}, standby "
                    f"{self.standby.creates[key]}"
                )
            elif n == 0 and acked:
                never.append(key)
        if twice:
            self.violations.append(f"{len(twice)} orders created more than once: {twice[:6]}")
        if never:
            self.violations.append(f"{len(never)} acknowledged orders never created: {never[:6]}")
        # 2. no serial of this node issued twice (every serial of every 2xx, across cuts)
        reused = {s: sorted(k) for s, k in led.serial_keys.items() if len(k) > 1}
        if reused:
            self.violations.append(
                f"{len(reused)} serials issued to more than one order: {list(reused.items())[:5]}"
            )
        # 3. no serial gets a second SMS
        sms_twice = {s: n for s, n in self.sms.per_serial().items() if n > 1}
        if sms_twice:
            self.violations.append(
                f"{len(sms_twice)} serials got more than one SMS: {list(sms_twice.items())[:6]}"
            )
        # 4. pending/ files that did not parse after a cut were quarantined with a reason
        rejected = self.spool / "rejected"
        for n, snap in enumerate(self.after_cut, 1):
            for name, why in snap["unparsable"].items():
                if not ((rejected / name).exists() and (rejected / f"{name}.reason.json").exists()):
                    self.violations.append(
                        f"cut #{n}: pending/{name} did not parse ({why}) "
                        "and is not in rejected/ with a reason"
                    )
        for name in order_files(self.spool / "pending"):
            self.violations.append(f"pending/{name} still there at the end")
        # 5. GET /v1/orders/{serial} answers 200 for every acknowledged serial
        missing = []
        for key, (status, serial) in led.first_ack.items():
            code, _doc = await self.get_json(f"/v1/orders/{serial}")
            if code != 200:
                missing.append(f"{serial} (first answer {status}, {key}) -> {code}")
        if missing:
            self.violations.append(
                f"{len(missing)} acknowledged serials unknown after the "
                f"restart (GET /v1/orders/{{serial}}): {missing[:6]}"
            )
        for key in sorted(led.inbox_keys):
            code, _ = await self.get_json(f"/v1/orders/by-key/{key}")
            if code != 200:
                missing.append(key)
                self.violations.append(f"inbox order {key}: GET /v1/orders/by-key -> {code}")
                break
        if self.replica is not None:
            await self.replica.after_drain(self)
        self.raise_violations()

    def raise_violations(self) -> None:
        """Write the summary line; every broken promise in one failure, with evidence."""
        self.summarize()
        if not self.violations:
            return
        led = self.ledger
        evidence = self.log_lines('"level":"error"', '"level":"critical"', limit=10)
        for log in sorted(self.logs.glob("recover-*.log")):
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            evidence += [f"{log.name}: {line}" for line in tail]
        raise AssertionError(
            f"[{self.name}] {len(self.violations)} broken promises after {self.cuts} "
            f"power cut(s); {led.acks()} orders acknowledged before the last cut "
            f"({len(led.acked_at_cut)}), {len(led.bodies)} sent, creates {self.creates()}"
            f", SMS {len(self.sms.received)}:\n- "
            + "\n- ".join(self.violations)
            + ("\nnotes: " + "; ".join(self.notes) if self.notes else "")
            + "\nagent log (errors):\n"
            + "\n".join(evidence)
        )

    def summarize(self) -> None:
        """One JSON line per scenario in $POWERLOSS_SUMMARY (figures for the README)."""
        path = os.environ.get("POWERLOSS_SUMMARY")
        if not path:
            return
        led = self.ledger
        line = {
            "scenario": self.name,
            "cuts": self.cuts,
            "acked_before_cut": len(led.acked_at_cut),
            "acked_202_before_cut": sum(1 for s, _ in led.acked_at_cut.values() if s == 202),
            "acked_201_before_cut": sum(1 for s, _ in led.acked_at_cut.values() if s == 201),
            "orders": len(led.bodies),
            "inbox": len(led.inbox_keys),
            "creates_primary": sum(self.primary.creates.values()),
            "creates_standby": sum(self.standby.creates.values()),
            "sms": len(self.sms.received),
            "after_cut": self.after_cut,
            # buffered orders with a phone whose notice never reached the gateway
            # (figure only: "ambiguous" rows are rightly never resent)
            "sms_never_sent": sum(
                1
                for k, (st, serial) in led.first_ack.items()
                if st == 202
                and b"customer_phone" in led.bodies[k]
                and serial not in self.sms.per_serial()
            ),
            "replicated": self.replica is not None,
            "notes": self.notes,
            "violations": [v[:300] for v in self.violations],
        }
        with open(path, "a") as fh:
            fh.write(orjson.dumps(line).decode() + "\n")

    async def recover_and_check(self, drain_timeout: float = 60) -> None:
        await self.restart()
        await self.retry_everything()
        await self.drained(drain_timeout)
        await self.check()


async def cut_when(
    world: World, predicate: Callable[[], Any], what: str, timeout: float = 30
) -> None:
    """Wait for observable progress, then pull the plug."""
    try:
        await wait_until(predicate, timeout, what, interval=0.005)
    except AssertionError as exc:
        raise AssertionError(
            f"[{world.name}] cut point never reached: {exc}; ledger "
            f"{dict(world.ledger.statuses)}\n{world.log_tail(1500)}"
        ) from None
    await world.power_cut()


def fire(*coros: Awaitable[Any]) -> Iterable[asyncio.Task[Any]]:
    return [asyncio.ensure_future(c) for c in coros]
