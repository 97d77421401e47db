"""Helpers for the edge-recover tests: buffer directories and the tool as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.spool.record import PendingRecord
from tests.support.harness import ROOT, wait_for


def body(n: int | str, **extra: Any) -> str:
    return orjson.dumps(
        {
            "channel_id": "douyin",
            "channel_order_id": str(n),
            "amount": "199.10",
            "items": [{"sku": f"SKU-{n}", "qty": 1}],
            **extra,
        }
    ).decode()


def record(
    n: int | str, serial_n: int, node: str = "wh-a", text: str | None = None, key: str | None = None
) -> PendingRecord:
    return PendingRecord(
        serial=f"{node.upper()}-20261125-{serial_n:09d}",
        node_id=node,
        received_at="2026-11-25T10:00:00+08:00",
        channel_id="douyin",
        dedupe_key=key or f"douyin:{n}",
        customer_phone=None,
        body=text if text is not None else body(n),
    )


def write_pending(root: Path, records: list[PendingRecord]) -> None:
    pending = root / "pending"
    pending.mkdir(parents=True, exist_ok=True)
    for r in records:
        (pending / r.filename).write_bytes(r.to_bytes())


def files(root: Path, sub: str = "") -> list[str]:
    d = root / sub if sub else root
    if not d.is_dir():
        return []
    return sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its mtime and content: "changes nothing" is checkable."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def merge_args(root: Path | str, target: str, *extra: str) -> tuple[str, ...]:
    """``--path ROOT --mode merge --target TARGET`` and ``extra``: the usual merge."""
    return ("--path", str(root), "--mode", "merge", "--target", target, *extra)


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def maxrss_mb(self) -> float:
        """Peak RSS of edge-recover, from a run with ``rss=True``."""
        kb = next(line for line in reversed(self.err.splitlines()) if line.startswith("maxrss_kb="))
        return int(kb.split("=")[1]) / 1024


# Runs its arguments as a child and reports the child's peak RSS (getrusage of the
# waited-for children: exactly that one process, whatever the test process did before).
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(f'maxrss_kb={kb}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


class Recover:
    """``python -m recovery`` as a real subprocess, started without blocking the test's loop.

    ``user``: a command prefix that runs it as another user (``AS_NOBODY``);
    ``rss``: measure its peak RSS (``Run.maxrss_mb``)."""

    def __init__(self, *args: str, user: tuple[str, ...] = (), rss: bool = False) -> None:
        self.args = args
        self.prefix = (*user, sys.executable, "-c", _RSS_WRAPPER) if rss else user
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Recover:
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix,
            sys.executable,
            "-m",
            "recovery",
            *self.args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "EDGE_AGENT_CONFIG": "/nonexistent/agent.toml"},
        )
        self._err = bytearray()
        self._err_task = asyncio.create_task(self._read_err())
        return self

    async def _read_err(self) -> None:
        """Collect stderr as it comes, so a test can wait for a line mid-run."""
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self._err += chunk

    def err_so_far(self) -> str:
        return self._err.decode(errors="replace")

    async def _output(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        out = await self.proc.stdout.read()
        await self._err_task
        await self.proc.wait()
        return out

    def signal(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def finish(self, timeout: float = 60) -> Run:
        assert self.proc is not None
        try:
            out = await asyncio.wait_for(self._output(), timeout)
        finally:
            if self.proc.returncode is None:  # timed out: never leave it behind
                self.proc.kill()
                await self.proc.wait()
                await self._err_task
        assert self.proc.returncode is not None
        return Run(self.proc.returncode, out.decode(), self.err_so_far())


async def recover(
    *args: str, timeout: float = 60, user: tuple[str, ...] = (), rss: bool = False
) -> Run:
    return await (await Recover(*args, user=user, rss=rss).start()).finish(timeout)


async def kill_when(
    proc: Recover, predicate: Any, sig: int, what: str, timeout: float = 30
) -> None:
    """Send ``sig`` as soon as ``predicate`` holds (polled with a deadline)."""

    def ready() -> bool:
        assert proc.proc is not None
        if proc.proc.returncode is not None:
            return True
        return bool(predicate())

    await wait_for(ready, timeout, what, interval=0.005)
    if proc.proc is not None and proc.proc.returncode is None:
        proc.signal(sig)


def report(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(path.read_bytes())
    return doc
