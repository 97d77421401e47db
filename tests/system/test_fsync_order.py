"""The part LazyFS cannot see: directory entries, proven by the order of syscalls.

LazyFS sends create/rename/unlink straight to its disk, so a missing directory fsync
survives its clear-cache. Here the real agent runs under ``strace -f -tt -T -yy`` on a
plain disk, and the trace must show, for every order answered 202:

    fsync(pending/.S.json.tmp)  <  rename(-> pending/S.json)  <  fsync(pending/)  <  reply

for every file taken from inbox/ (the only copy of its order until then):

    rename(-> pending/S.json) < fsync(pending/) < unlink(inbox/NAME)

for every order the drain or ``edge-recover --mode merge`` delivered (moved to merged/):

    fsync(merged/.S.json.tmp) < rename(-> merged/S.json) < fsync(merged/) < unlink(pending/S.json)

(a syncfs counts as both fsyncs; a rename of pending/S.json itself into merged/ is atomic
and needs merged/ synced after it)

and, for each start of the agent, a commit of the journal with an fsync of its WAL
between the first request and the first reply that carries a serial (the serial
block's reservation is durable before any serial of it is handed out). Orders and
files are correlated by serial: file names contain it, replies contain it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from recovery.checkpoint import CHECKPOINT_NAME
from tests.support import host_tools
from tests.support.powerloss_harness import Proc, World, orders, wait_until
from tests.support.powerloss_strace import TRACE_CALLS, Call, parse, unescape

pytestmark = [pytest.mark.power_loss, pytest.mark.timeout(240)]

if shutil.which("strace") is None:
    if host_tools.required() or os.geteuid() == 0:
        host_tools.ensure({"strace": "strace"})  # Debian's strace: a real tool, not a mock
    else:
        pytestmark.append(pytest.mark.skip(reason="strace missing: apt-get install strace"))


@dataclass
class PlainDisk:
    """Stands in for a LazyFs mount: a plain directory (strace needs no FUSE)."""

    base: Path

    @property
    def mnt(self) -> Path:
        return self.base / "disk"


def strace_prefix(trace: Path, *more: str) -> list[str]:
    return [
        "strace",
        "-f",
        "-tt",
        "-T",
        "-yy",
        "-qq",
        "-s",
        "65536",
        "-o",
        str(trace),
        "-e",
        f"trace={','.join((TRACE_CALLS, *more))}",
    ]


def agent_pid(strace_pid: int) -> int:
    """The traced agent: strace's child."""
    with open(f"/proc/{strace_pid}/task/{strace_pid}/children") as fh:
        return int(fh.read().split()[0])


async def stop_agent(w: World) -> None:
    """SIGTERM the agent itself (not strace), so strace flushes and exits after it."""
    assert w.agent is not None
    proc = w.agent.proc
    os.kill(agent_pid(proc.pid), signal.SIGTERM)
    await wait_until(lambda: proc.poll() is not None, 30, "the traced agent to exit")
    w.agent.kill()  # reaps, closes the log


@dataclass
class Reply:
    serial: str
    status: int
    start: float  # first byte of the response on the client's socket


def replies(calls: list[Call], port: int) -> list[Reply]:
    """Responses the agent wrote to clients, by serial, with the time of their first byte."""
    marker = f"127.0.0.1:{port}->"
    header_at: dict[str, tuple[float, int]] = {}
    out = []
    for c in calls:
        if c.name not in ("write", "writev", "sendto", "sendmsg") or marker not in c.fd_path:
            continue
        text = unescape("".join(c.strings))
        m = re.search(r"HTTP/1\.1 (\d{3})", text)
        if m:
            header_at[c.fd_path] = (c.start, int(m[1]))
        if c.fd_path in header_at and '"serial"' in text:
            s = re.search(r'"serial":"([^"]+)"', text)
            if s:
                start, status = header_at.pop(c.fd_path)
                out.append(Reply(s[1], status, start))
    return out


def first_request(calls: list[Call], port: int) -> float | None:
    marker = f"127.0.0.1:{port}->"
    for c in calls:
        if (
            c.name == "recvfrom"
            and marker in c.fd_path
            and any("POST /v1/orders" in s for s in c.strings)
        ):
            return c.start
    return None


class Index:
    """fsyncs by path, renames by target, unlinks by path."""

    def __init__(self, calls: list[Call]) -> None:
        self.fsyncs: defaultdict[str, list[Call]] = defaultdict(list)
        self.renames: dict[str, Call] = {}
        self.rename_src: dict[str, str] = {}
        self.unlinks: defaultdict[str, list[Call]] = defaultdict(list)
        self.wal_fsyncs: list[Call] = []
        self.syncfs: list[Call] = []
        for c in calls:
            if not c.ok:
                continue
            if c.name == "syncfs":
                self.syncfs.append(c)
            if c.name in ("fsync", "fdatasync"):
                self.fsyncs[c.fd_path].append(c)
                if c.fd_path.endswith("journal.sqlite3-wal") or c.fd_path.endswith(
                    "journal.sqlite3"
                ):
                    self.wal_fsyncs.append(c)
            elif c.name.startswith("rename") and len(c.strings) >= 2:
                self.renames[c.strings[1]] = c
                self.rename_src[c.strings[1]] = c.strings[0]
            elif c.name.startswith("unlink") and c.strings:
                self.unlinks[c.strings[-1]].append(c)

    def fsync_between(self, path: str, after: float, before: float) -> Call | None:
        for c in self.fsyncs.get(path, []):
            if c.start >= after and c.end <= before:
                return c
        return None

    def synced_between(self, path: str, after: float, before: float) -> Call | None:
        """An fsync of ``path`` or a syncfs (the whole filesystem) inside the window."""
        hit = self.fsync_between(path, after, before)
        if hit is not None:
            return hit
        for c in self.syncfs:
            if c.start >= after and c.end <= before:
                return c
        return None


def check_buffered(idx: Index, spool: Path, reply: Reply) -> str | None:
    pending = str(spool / "pending")
    tmp, final = f"{pending}/.{reply.serial}.json.tmp", f"{pending}/{reply.serial}.json"
    rename = idx.renames.get(final)
    if rename is None or idx.rename_src.get(final) != tmp:
        return f"{reply.serial}: no rename {tmp} -> {final} in the trace"
    if rename.start > reply.start:
        return (
            f"{reply.serial}: renamed into pending/ {rename.start - reply.start:.6f}s after "
            "the 202 was written"
        )
    if idx.fsync_between(tmp, 0, rename.start) is None:
        return f"{reply.serial}: the temp file was not fsync'd before its rename"
    if idx.fsync_between(pending, rename.end, reply.start) is None:
        return f"{reply.serial}: pending/ was not fsync'd between the rename and the 202"
    return None


def check_merged(idx: Index, spool: Path, serial: str) -> str | None:
    """Out of pending/ into merged/: by an atomic rename of the file itself, or by a
    new copy whose data and directory entry are durable before the pending entry goes."""
    merged, pending = str(spool / "merged"), str(spool / "pending")
    final, gone = f"{merged}/{serial}.json", f"{pending}/{serial}.json"
    rename = idx.renames.get(final)
    if rename is None:
        return f"{serial}: no rename into merged/ in the trace"
    src = idx.rename_src[final]
    if src == gone:  # the file itself moved: it is in exactly one directory at every instant
        if idx.synced_between(merged, rename.end, float("inf")) is None:
            return f"{serial}: merged/ never synced after the rename out of pending/"
        return None
    unlinks = idx.unlinks.get(gone, [])
    if not unlinks:
        return f"{serial}: delivered but pending/{serial}.json never unlinked"
    unlink = unlinks[0]
    if rename.end > unlink.start:
        return f"{serial}: pending entry unlinked before the merged copy was renamed in"
    if (
        idx.fsync_between(src, 0, rename.start) is None
        and idx.synced_between("", rename.end, unlink.start) is None
    ):
        return f"{serial}: merged copy {src} not durable before the pending unlink"
    if idx.synced_between(merged, rename.end, unlink.start) is None:
        return f"{serial}: merged/ not synced between the rename and the pending unlink"
    return None


def check_merge_processes(calls: list[Call], spool: Path) -> str | None:
    """edge-recover claims pending/ files and writes its checkpoint on one thread: in
    several threads side by side these short system calls handed the GIL over at every
    call (10 futex calls per merged file, 1.35 on one thread). The renames into merged/,
    and the order_id written into each file before its rename, come from the mover, a
    process of its own (it ran execve): there they cost the merge's GIL nothing
    (agent/spool/mover.py). The order of the steps is checked by check_merged and
    check_checkpoint_first."""
    pending, merged = f"{spool}/pending/", f"{spool}/merged/"
    claims, tails, moves, checkpoint = set(), set(), set(), set()
    started = {c.pid for c in calls if c.name == "execve" and c.ok}
    for c in calls:
        if not c.ok:
            continue
        if c.name == "openat" and c.strings and c.strings[0].startswith(pending):
            (tails if "O_WRONLY" in c.line else claims).add(c.pid)
        elif c.name.startswith("rename") and len(c.strings) >= 2:
            if c.strings[1].startswith(merged):
                moves.add(c.pid)
        elif c.name in ("pwrite64", "write") and c.fd_path.endswith(f"{CHECKPOINT_NAME}-wal"):
            checkpoint.add(c.pid)
    if not claims or not moves or not checkpoint:
        return f"no claims, moves or checkpoint writes in the trace: {claims} {moves} {checkpoint}"
    if len(claims) != 1 or not claims <= checkpoint:
        return (
            f"claims on threads {sorted(claims)}, checkpoint writes on {sorted(checkpoint)}: "
            "not one thread"
        )
    if len(moves) != 1 or not moves <= started or moves & checkpoint or not tails <= moves:
        return (
            f"moves into merged/ on {sorted(moves)}, order_id writes on {sorted(tails)}, "
            f"processes started {sorted(started)}: not one mover process of its own"
        )
    return None


def check_checkpoint_first(calls: list[Call], idx: Index, spool: Path, serial: str) -> str | None:
    """The checkpoint holds an order's outcome before its file is renamed into merged/
    (a rerun then finishes the move without asking the center again). The outcome row is
    found by the center's order_id, which the mover writes into the file before the
    rename: no row can name it before the center answered."""
    pending = f"{spool}/pending/{serial}.json"
    rename = idx.renames.get(f"{spool}/merged/{serial}.json")
    tail = next((c for c in calls if c.name == "pwrite64" and c.fd_path == pending and c.ok), None)
    order_id = re.search(r'"order_id":"([^"]+)"', unescape("".join(tail.strings))) if tail else None
    if rename is None or order_id is None:
        return f"{serial}: no rename into merged/ or no order_id written into it in the trace"
    row = next(
        (
            c
            for c in calls
            if c.name == "pwrite64"
            and c.fd_path.endswith(f"{CHECKPOINT_NAME}-wal")
            and order_id[1] in unescape("".join(c.strings))
        ),
        None,
    )
    if row is None or row.end > rename.start:
        return (
            f"{serial}: renamed into merged/ before the checkpoint had its order_id {order_id[1]}"
        )
    return None


def check_inbox(
    calls: list[Call], idx: Index, spool: Path, key_of_file: dict[str, str]
) -> list[str]:
    """An inbox file (the only copy of its order until then) is unlinked only after the
    order's pending file is renamed in and pending/ is fsync'd."""
    serial_of = {}
    for c in calls:
        if c.name == "write" and c.fd_path.endswith(".json.tmp") and "/pending/." in c.fd_path:
            text = unescape("".join(c.strings))
            key, serial = (re.search(rf'"{f}":"([^"]+)"', text) for f in ("dedupe_key", "serial"))
            if key and serial:
                serial_of[key[1]] = serial[1]
    problems = []
    pending = str(spool / "pending")
    for name, key in key_of_file.items():
        unlinks = idx.unlinks.get(f"{spool}/inbox/{name}")
        serial = serial_of.get(key)
        rename = idx.renames.get(f"{pending}/{serial}.json") if serial else None
        if not unlinks or rename is None:
            problems.append(
                f"inbox/{name} ({key}): no pending file written "
                f"({serial}) or never unlinked ({bool(unlinks)})"
            )
        elif rename.end > unlinks[0].start:
            problems.append(f"inbox/{name}: unlinked before {serial} was renamed into pending/")
        elif idx.fsync_between(pending, rename.end, unlinks[0].start) is None:
            problems.append(
                f"inbox/{name}: unlinked before pending/ was fsync'd after {serial} was renamed in"
            )
    return problems


def check_reservation(calls: list[Call], idx: Index, port: int, run: str) -> str | None:
    got = [r for r in replies(calls, port) if r.status in (200, 201, 202)]
    t0 = first_request(calls, port)
    if not got or t0 is None:
        return f"{run}: no request/reply with a serial found in the trace"
    first = min(got, key=lambda r: r.start)
    wal = [c for c in idx.wal_fsyncs if c.start >= t0 and c.end <= first.start]
    if not wal:
        return (
            f"{run}: no fsync of the journal between the first request and the first "
            f"serial handed out ({first.serial}): the serial block is not durable"
        )
    return None


async def test_fsync_order_under_strace() -> None:
    base = Path(tempfile.mkdtemp(prefix="fsync_order_"))
    w = World(PlainDisk(base), "w")
    trace1, trace2, trace3 = (base / f"trace-{n}.txt" for n in (1, 2, 3))
    try:
        # run 1: offline intake (202), then the primary returns and the drain moves them
        w.agent_prefix = strace_prefix(trace1)
        await w.start(primary=False, standby=False, sms=False)
        w.start_load(orders("so", 48))
        await w.finish_load()
        buffered = {s for _, s in w.ledger.first_ack.values()}
        assert w.ledger.acks(202) == 48, dict(w.ledger.statuses)
        await w.primary.come_up()
        await wait_until(
            lambda: len(w.merged()) == 48 and not w.pending(),
            60,
            "the drain to move every order to merged/",
        )
        await stop_agent(w)
        # run 2: restart offline; a new serial block must be reserved durably again
        await w.primary.go_down()
        w.agent_prefix = strace_prefix(trace2)
        await w.start_agent()
        await w.settle()
        dropped = orders("si", 8)
        w.drop_inbox(dropped)
        w.start_load(orders("so2", 16))
        await w.finish_load()
        await wait_until(lambda: not os.listdir(w.spool / "inbox"), 30, "inbox pick-up")
        await stop_agent(w)
        # run 3: edge-recover merges what run 2 buffered (its moves: rename + syncfs)
        recovered = {n.removesuffix(".json") for n in w.pending()}
        assert len(recovered) == 24, w.pending()
        await w.primary.come_up()
        rec = Proc(
            [
                *strace_prefix(trace3, "execve"),
                sys.executable,
                "-m",
                "recovery",
                "--path",
                str(w.spool),
                "--mode",
                "merge",
                "--target",
                w.primary.url,
            ],
            w.logs / "recover.log",
        )
        try:
            await wait_until(lambda: rec.proc.poll() is not None, 60, "edge-recover to finish")
        finally:
            rec.kill()
        assert rec.proc.returncode == 0, (w.logs / "recover.log").read_text()[-2000:]
        assert not w.pending(), w.pending()

        calls1, calls2 = parse(trace1), parse(trace2)
        idx1, idx2 = Index(calls1), Index(calls2)
        problems = []
        rs1 = [r for r in replies(calls1, w.port) if r.status == 202]
        rs2 = [r for r in replies(calls2, w.port) if r.status == 202]
        assert {r.serial for r in rs1} == buffered, "every 202 must be found in the trace"
        assert len(rs2) == 16, "run 2: every 202 must be found in the trace"
        for idx, rs in ((idx1, rs1), (idx2, rs2)):
            problems += [p for r in rs if (p := check_buffered(idx, w.spool, r))]
        problems += [p for s in sorted(buffered) if (p := check_merged(idx1, w.spool, s))]
        problems += check_inbox(
            calls2, idx2, w.spool, {f"drop-{i:05d}.json": k for i, k in enumerate(dropped)}
        )
        calls3 = parse(trace3)
        idx3 = Index(calls3)
        problems += [
            f"edge-recover: {p}" for s in sorted(recovered) if (p := check_merged(idx3, w.spool, s))
        ]
        problems += [
            f"edge-recover: {p}"
            for s in sorted(recovered)
            if (p := check_checkpoint_first(calls3, idx3, w.spool, s))
        ]
        if p := check_merge_processes(calls3, w.spool):
            problems.append(f"edge-recover: {p}")
        for calls, idx, run in ((calls1, idx1, "run 1"), (calls2, idx2, "run 2")):
            if p := check_reservation(calls, idx, w.port, run):
                problems.append(p)
        assert not problems, (
            f"{len(problems)} durability steps out of order (traces in "
            f"{base}):\n- " + "\n- ".join(problems[:20])
        )
    finally:
        await w.close()
    shutil.rmtree(base, ignore_errors=True)


def _reply(ts: str, serial: str) -> str:
    body = '{\\"status\\":\\"buffered\\",\\"serial\\":\\"' + serial + '\\"}'
    return (
        f'11 {ts} sendto(9<TCP:[127.0.0.1:1->127.0.0.1:2]>, "HTTP/1.1 202 Accepted'
        f'\\r\\n\\r\\n{body}", 60, 0, NULL, 0) = 60 <0.000010>'
    )


def _rename(ts: str, n: int) -> str:
    name = f"N-20260101-{n:09d}.json"
    return f'10 {ts} rename("/s/pending/.{name}.tmp", "/s/pending/{name}") = 0 <0.000010>'


_SYNTHETIC = (
    "\n".join(
        [
            "10 10:00:00.000100 fsync(5</s/pending/.N-20260101-000000001.json.tmp> "
            "<unfinished ...>",
            _reply("10:00:00.000150", "N-20260101-000000002"),
            "10 10:00:00.000200 <... fsync resumed>) = 0 <0.000100>",
            _rename("10:00:00.000300", 1),
            "10 10:00:00.000400 fsync(6</s/pending>) = 0 <0.000050>",
            _reply("10:00:00.000500", "N-20260101-000000001"),
            _rename("10:00:00.000600", 2),
        ]
    )
    + "\n"
)


def test_checker_catches_a_reply_before_durability(tmp_path: Path) -> None:
    """The checks above would fail on an agent that answers before the rename and the
    directory fsync (serial 2), and pass the one that waits (serial 1)."""
    trace = tmp_path / "trace.txt"
    trace.write_text(_SYNTHETIC)
    calls = parse(trace)
    idx = Index(calls)
    got = {r.serial: r for r in replies(calls, 1)}
    assert set(got) == {"N-20260101-000000001", "N-20260101-000000002"}
    assert check_buffered(idx, Path("/s"), got["N-20260101-000000001"]) is None
    problem = check_buffered(idx, Path("/s"), got["N-20260101-000000002"])
    assert problem is not None and "after the 202" in problem


def test_process_checker_tells_the_merge_layout_from_others(tmp_path: Path) -> None:
    """check_merge_processes passes a merge whose claims and checkpoint writes share a
    thread and whose moves come from one started process, and names the pids otherwise."""
    name = "N-20260101-000000001.json"
    lines = [
        # as strace -yy writes it: the directory and the returned descriptor annotated
        '{mover} 10:00:00.000050 execve("/usr/bin/python3", ["python3"], 0x1 /* 1 vars */) = 0',
        f'{{claim}} 10:00:00.000100 openat(AT_FDCWD</w>, "/s/pending/{name}", O_RDWR) '
        f"= 5</s/pending/{name}> <0.00001>",
        f'{{ck}} 10:00:00.000200 pwrite64(7</s/{CHECKPOINT_NAME}-wal>, "x", 1, 0) = 1 <0.00001>',
        f'{{tail}} 10:00:00.000250 openat(AT_FDCWD</w>, "/s/pending/{name}", O_WRONLY) '
        f"= 3</s/pending/{name}> <0.00001>",
        f'{{move}} 10:00:00.000300 rename("/s/pending/{name}", "/s/merged/{name}") = 0 <0.00001>',
    ]
    for pids, ok in (
        ((10, 10, 20, 20, 20), True),  # claim, checkpoint, mover (execve), tail, move
        ((10, 10, 20, 10, 20), False),  # order_id written by the merge, renamed by the mover
        ((10, 10, 99, 20, 20), False),  # the mover is a thread: it ran no execve
        ((10, 10, 10, 10, 10), False),  # everything on the merge's one thread
        ((10, 11, 20, 20, 20), False),  # the checkpoint on a thread of its own
        ((10, 20, 20, 20, 20), False),  # the checkpoint written by the mover
    ):
        trace = tmp_path / f"trace-{'-'.join(map(str, pids))}.txt"
        claim, ck, mover, tail, move = pids
        text = "\n".join(
            ln.format(claim=claim, ck=ck, mover=mover, tail=tail, move=move) for ln in lines
        )
        trace.write_text(text)
        problem = check_merge_processes(parse(trace), Path("/s"))
        assert (problem is None) is ok, (pids, problem)


def request_times(calls: list[Call], port: int) -> dict[str, float]:
    """channel_order_id -> when the client's POST carrying it was read by the agent."""
    marker = f"127.0.0.1:{port}->"
    out: dict[str, float] = {}
    for c in calls:
        if c.name == "recvfrom" and marker in c.fd_path:
            for m in re.finditer(r'"channel_order_id":"([^"]+)"', unescape("".join(c.strings))):
                out.setdefault(m[1], c.start)
    return out


def upstream_sends(calls: list[Call], cluster_host: str) -> dict[str, float]:
    """serial -> when the agent started sending its POST to the cluster."""
    out: dict[str, float] = {}
    for c in calls:
        if c.name in ("write", "writev", "sendto", "sendmsg") and f"->{cluster_host}:" in c.fd_path:
            for m in re.finditer(r"X-Edge-Serial: ([^\r\\]+)", unescape("".join(c.strings))):
                out.setdefault(m[1].strip(), c.start)
    return out


async def test_forwarded_rows_durable_around_the_send() -> None:
    """For every 201: the journal's "forwarding" intent is fsync'd before the order
    leaves for the cluster (after a power cut the serial must still be known, and a
    retry must go to the same cluster under it and get 200 duplicate). The "forwarded"
    row is committed behind the 201 (issue 23): nothing else waits between the send and
    the 201; tests/system/test_power_loss.py cuts in that window."""
    base = Path(tempfile.mkdtemp(prefix="fsync_order_"))
    w = World(PlainDisk(base), "fwd")
    trace = base / "trace.txt"
    try:
        w.agent_prefix = strace_prefix(trace)
        await w.start(primary=True, standby=False, sms=False)
        bodies = orders("fw", 32)
        w.start_load(bodies)
        await w.finish_load()
        assert w.ledger.acks(201) == 32, dict(w.ledger.statuses)
        await stop_agent(w)
        calls = parse(trace)
        idx = Index(calls)
        asked = request_times(calls, w.port)
        sent = upstream_sends(calls, w.primary.host)
        problems = []
        for r in (r for r in replies(calls, w.port) if r.status == 201):
            key = next(k for k, (_, s) in w.ledger.first_ack.items() if s == r.serial)
            t_req, t_send = asked.get(key.split(":", 1)[1]), sent.get(r.serial)
            if t_req is None or t_send is None:
                problems.append(f"{r.serial}: request or upstream send not in the trace")
                continue
            if not [c for c in idx.wal_fsyncs if c.start >= t_req and c.end <= t_send]:
                problems.append(
                    f"{r.serial}: no journal fsync between the request and the "
                    "send to the cluster (the intent row is not durable)"
                )
        assert not problems, (
            f"{len(problems)} of 32 durability steps missing (trace "
            f"{trace}):\n- " + "\n- ".join(problems[:12])
        )
    finally:
        await w.close()
    shutil.rmtree(base, ignore_errors=True)


async def test_one_journal_fsync_per_forwarded_order() -> None:
    """One client, orders one after the other: each forwarded order costs one fsync of
    the journal's WAL, its intent's. The "forwarded" row committed behind the 201 has
    none of its own (issue 23, goal 2): were it fsync'd, the next order's intent would
    wait for that fsync first, two per order. After a clean stop every row says
    "forwarded", and the journal's WAL is gone: closing the database checkpointed it,
    with its fsyncs, so the rows without an fsync of their own are durable too."""
    base = Path(tempfile.mkdtemp(prefix="fsync_order_"))
    w = World(PlainDisk(base), "fwd1")
    trace = base / "trace.txt"
    n = 24
    try:
        w.agent_prefix = strace_prefix(trace)
        await w.start(primary=True, standby=False, sms=False)
        w.start_load(orders("one", n), clients=1)
        await w.finish_load()
        assert w.ledger.acks(201) == n, dict(w.ledger.statuses)
        await stop_agent(w)
        wal = w.state / "journal.sqlite3-wal"
        assert not wal.exists() or wal.stat().st_size == 0, f"{wal}: {wal.stat().st_size} B"
        calls = parse(trace)
        created = sorted(r.start for r in replies(calls, w.port) if r.status == 201)
        assert len(created) == n, f"{len(created)} replies of 201 in the trace {trace}"
        syncs = [c for c in Index(calls).wal_fsyncs if created[0] < c.start < created[-1]]
        # n - 1 intents lie between the first 201 and the last; one more for slack (a
        # serial block's reservation is a durable commit too).
        assert len(syncs) <= n, (
            f"{len(syncs)} fsyncs of the journal's WAL for the {n - 1} orders forwarded "
            f"between the first 201 and the last (trace {trace})"
        )
        with contextlib.closing(
            sqlite3.connect(f"file:{w.state}/journal.sqlite3?mode=ro", uri=True)
        ) as db:
            states = dict(db.execute("SELECT state, count(*) FROM orders GROUP BY state"))
        assert states == {"forwarded": n}, states
    finally:
        await w.close()
    shutil.rmtree(base, ignore_errors=True)
