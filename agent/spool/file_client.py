"""The agent's side of the pending/ writer process (``agent.spool.file_proc``).

One object owns the child process and the task that reads its answers. An order's
``write`` returns once the child said its file is durable in pending/ (file fsync,
rename, directory fsync, in that order). If the child ends while orders wait, the
agent settles them itself (``settle_orphans``): a file the child had renamed into
pending/ is whole and fsync'd (the rename comes after the file's fsync), so one
directory fsync here makes it durable and its order is acknowledged; every other
order gets PersistError (not acknowledged: the client retries with the same key)
and its temp file is removed. So a retry never meets a file of its own key left in
pending/ under another serial (two such files could be delivered to two clusters
with separate idempotency stores). The next write starts a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from agent.base.durable import TMP_SUFFIX, fsync_dir, translate, unlink_quietly
from agent.base.syscalls import CODE_ROOT, child_code, own_executable
from agent.base.tasks import cancel_and_wait
from agent.errors import OrderFileError, PersistError
from agent.spool.file_proc import ERROR, EXISTS, OK, READY
from agent.spool.reading import read_order_file
from agent.spool.record import PendingRecord

log = logging.getLogger("agent.spool")
# A new Python process imports the agent's file modules before it says "ready".
START_TIMEOUT_S = 30.0
_CHILD = child_code("agent.spool.file_proc")


class _Child:
    """One run of the writer process and the orders waiting on its answers."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: dict[str, tuple[asyncio.Future[None], PendingRecord]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.ended = False


class FileProcess:
    """Owns the pending/ writer process; ``start()``/``stop()``."""

    def __init__(self, pending: str, threads: int) -> None:
        self._pending = pending
        self._threads = threads
        self._child: _Child | None = None
        self._spawning = asyncio.Lock()
        self._stopped = True

    async def start(self) -> None:
        self._stopped = False
        await self._running()

    async def stop(self) -> None:
        """Let the child finish and answer every order sent to it, then reap it."""
        self._stopped = True
        child, self._child = self._child, None
        if child is None:
            return
        stdin = child.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        if child.reader is not None:
            try:
                await child.reader
            except asyncio.CancelledError:
                await cancel_and_wait(child.reader)
                raise
        await child.proc.wait()

    async def write(self, record: PendingRecord) -> None:
        """Return once ``record`` is durable in pending/; else raise PersistError."""
        child = await self._running()
        name = record.filename
        if name in child.waiting:
            raise PersistError(f"pending/{name} is being written already")
        data = record.to_bytes()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        child.waiting[name] = (fut, record)
        stdin = child.proc.stdin
        assert stdin is not None
        # Should the child be gone (perhaps after it read this frame and renamed the
        # file), its reader settles this order with the others it left (settle_orphans).
        with contextlib.suppress(ConnectionError, RuntimeError):
            stdin.write(b"%s %d\n%s" % (name.encode(), len(data), data))
            await stdin.drain()
        await fut

    async def _running(self) -> _Child:
        if self._stopped:
            raise RuntimeError("pending/ writes before start() or after stop()")
        child = self._child
        if child is not None and not child.ended:
            return child
        async with self._spawning:
            child = self._child
            if child is None or child.ended:
                child = self._child = await self._spawn()
            return child

    async def _spawn(self) -> _Child:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory's "agent", if it has one: ours
                "-c",
                _CHILD.format(root=CODE_ROOT),
                self._pending,
                str(self._threads),
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                executable=own_executable(),
            )
        except OSError as exc:
            raise PersistError(
                f"cannot start the pending/ writer process ({sys.executable}, "
                f"agent.spool.file_proc from {CODE_ROOT}): {exc}"
            ) from exc
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                first = await proc.stdout.readline()
        except TimeoutError:
            first = b""
        if first != READY:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
            raise PersistError(
                f"the pending/ writer process ({sys.executable}, agent.spool.file_proc "
                f"from {CODE_ROOT}) did not start (exit {code}, said {first!r}; its "
                "error is in the agent's log)"
            )
        child = _Child(proc)
        child.reader = asyncio.create_task(self._read(child), name="pending-writer-answers")
        return child

    async def _read(self, child: _Child) -> None:
        stdout = child.proc.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                self._answered(child, line)
        finally:
            child.ended = True
            code = await child.proc.wait()
            if child.waiting:
                await self._orphans(child, code)

    async def _orphans(self, child: _Child, code: int) -> None:
        """The child ended with orders unanswered: settle each here, never leave one."""
        waiting, child.waiting = child.waiting, {}
        kept: list[str] = []
        why = "it was not renamed into pending/"
        try:
            kept = await asyncio.to_thread(
                settle_orphans, self._pending, {n: r.to_bytes() for n, (_, r) in waiting.items()}
            )
        except OSError as exc:
            why = f"the directory fsync after it failed: {exc}"
        finally:
            for name, (fut, _) in waiting.items():
                if fut.done():
                    continue
                if name in kept:
                    fut.set_result(None)
                else:
                    fut.set_exception(
                        PersistError(
                            f"the pending/ writer process ended (exit {code}) before "
                            f"pending/{name} was durable, and {why}"
                        )
                    )
            log.error(
                "the pending/ writer process ended (exit %s) with %d orders unanswered: "
                "%d were in pending/ and are acknowledged after a directory fsync, %d are "
                "refused (503, their temp files removed); a new process takes the next orders",
                code,
                len(waiting),
                len(kept),
                len(waiting) - len(kept),
            )

    def _answered(self, child: _Child, line: bytes) -> None:
        parts = line.decode("ascii", "replace").split()
        entry = child.waiting.pop(parts[0], None) if parts else None
        if entry is None:
            log.error("the pending/ writer process said %r about no order in flight", line)
            return
        fut, record = entry
        if fut.done():
            return  # its waiter was cancelled; the file is written all the same
        verdict = parts[1] if len(parts) > 1 else ""
        if verdict == OK:
            fut.set_result(None)
            return
        name = record.filename
        if verdict == EXISTS:
            # The serial was issued before (the counter went backwards somehow): the file
            # there is another acknowledged order. Never touched; this one is refused.
            fut.set_exception(
                PersistError(
                    f"pending/{name} already exists, so order {record.dedupe_key!r} "
                    f"(written to pending/.{name}{TMP_SUFFIX}) was not accepted and "
                    f"its temp file removed; serial {record.serial} was issued twice (did "
                    "the serial counter in agent.state_dir go back, or does another agent "
                    "write this buffer?); the existing file is untouched"
                )
            )
            return
        errno_ = 0
        with contextlib.suppress(IndexError, ValueError):
            errno_ = int(parts[2])
        what = "the pending/ directory entry" if parts[-1] == "dir" else f"pending/{name}"
        if verdict != ERROR:
            fut.set_exception(PersistError(f"cannot write {what}: answer {line!r}"))
        elif errno_ == 0:
            fut.set_exception(
                PersistError(
                    f"cannot write {what}: unexpected error in the pending/ writer process "
                    "(its traceback is in the agent's log)"
                )
            )
        else:
            fut.set_exception(translate(OSError(errno_, os.strerror(errno_)), what))


def settle_orphans(pending: str, orders: dict[str, bytes]) -> list[str]:
    """The names whose file is in pending/ with exactly the bytes handed over, made
    durable by one directory fsync (OSError if it fails: none is then acknowledged, and
    the files stay, as after a crash). Any other order's temp file is removed; a file of
    its name holding something else is not touched."""
    kept = []
    for name, data in orders.items():
        try:
            there: bytes | None = read_order_file(f"{pending}/{name}", follow_symlinks=False)
        except (OSError, OrderFileError):  # not there, or not what it renamed
            there = None
        if there == data:
            kept.append(name)
        else:
            unlink_quietly(f"{pending}/.{name}{TMP_SUFFIX}")
    if kept:
        fsync_dir(pending)
    return kept
