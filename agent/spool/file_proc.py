"""The pending/ writer process: each order's file steps, off the agent's GIL (issue 23).

Run by the agent (``file_client``) with the arguments PENDING_DIR THREADS AGENT_PID;
it ignores SIGTERM, SIGINT and SIGHUP (systemd and a terminal signal the whole group:
the agent decides when it stops, by closing its stdin, so orders in flight still get
their answers), and it dies with the agent (PR_SET_PDEATHSIG), so a kill -9 of the
agent leaves what a kill -9 always left: temp files that start-up removes, nothing
acknowledged.

Its first line on stdout is ``ready``. Then frames on stdin, one per order:
``NAME SIZE\\n`` then SIZE bytes, the file's content. Each of THREADS file
threads takes one order at a time through temp file, write, fsync and rename
(never over an existing file); one directory thread fsyncs pending/ for every
file renamed before that fsync began, then answers each of them. The answers on
stdout, one line per order:

* ``NAME ok`` — durable in pending/;
* ``NAME exists`` — a file of that name was there; it is untouched, the temp
  file removed;
* ``NAME error ERRNO STEP`` — a step failed (STEP: ``file`` or ``dir``); the
  file is not acknowledged (after a failed directory fsync it may stay).

In one process with the agent, these threads took the GIL between every system
call and slowed the event loop more than they sped the disk (docs/performance.md).
End of stdin: finish and answer every order read so far, then exit 0.
"""

from __future__ import annotations

import errno
import os
import queue
import sys
import threading
import traceback
from typing import BinaryIO

from agent.base.durable import TMP_SUFFIX, create_written, fsync_dir, unlink_quietly
from agent.base.syscalls import child_armed, rename_noreplace

OK, EXISTS, ERROR = "ok", "exists", "error"
READY = b"ready\n"  # the first line: it runs and will die with the agent


class FileSteps:
    """The file threads, the directory thread and the answer stream of one process."""

    def __init__(self, pending: str, threads: int, out: BinaryIO) -> None:
        self._pending = pending
        self._out = out
        self._out_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._renamed: list[str] = []
        self._cond = threading.Condition()
        self._files_done = False
        self._workers = [
            threading.Thread(target=self._file_worker, name=f"file_{n}", daemon=True)
            for n in range(max(1, threads))
        ]
        self._dir_thread = threading.Thread(target=self._dir_worker, name="dir", daemon=True)
        for thread in (*self._workers, self._dir_thread):
            thread.start()

    def put(self, name: str, data: bytes) -> None:
        self._queue.put((name, data))

    def close(self) -> None:
        """Finish every order put so far, answer it, and end the threads."""
        for _ in self._workers:
            self._queue.put(None)
        for thread in self._workers:
            thread.join()
        with self._cond:
            self._files_done = True
            self._cond.notify()
        self._dir_thread.join()

    def _file_worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, data = item
            answer = self._write_one(name, data)
            if answer is not None:
                self._answer([answer])
                continue
            with self._cond:
                self._renamed.append(name)
                self._cond.notify()

    def _write_one(self, name: str, data: bytes) -> bytes | None:
        """None once renamed into pending/; else the answer line."""
        if "/" in name or name.startswith(".") or not name:
            return f"{name or '-'} {ERROR} {errno.EINVAL} file\n".encode()  # not a pending name
        tmp = f"{self._pending}/.{name}{TMP_SUFFIX}"
        try:
            fd = create_written(tmp, data)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            rename_noreplace(tmp, f"{self._pending}/{name}")
        except FileExistsError:
            unlink_quietly(tmp)
            return f"{name} {EXISTS}\n".encode()
        except OSError as exc:
            unlink_quietly(tmp)
            return f"{name} {ERROR} {exc.errno or 0} file\n".encode()
        except Exception:  # never leave an order unanswered: this thread goes on
            traceback.print_exc()  # to the agent's stderr: its log
            unlink_quietly(tmp)
            return f"{name} {ERROR} 0 file\n".encode()
        return None

    def _dir_worker(self) -> None:
        while True:
            with self._cond:
                while not self._renamed and not self._files_done:
                    self._cond.wait()
                if not self._renamed:
                    return
                group, self._renamed = self._renamed, []
            try:
                fsync_dir(self._pending)
                tail = f" {OK}\n"
            except OSError as exc:
                tail = f" {ERROR} {exc.errno or 0} dir\n"
            except Exception:  # never leave the group unanswered: this thread goes on
                traceback.print_exc()
                tail = f" {ERROR} 0 dir\n"
            self._answer([(name + tail).encode() for name in group])

    def _answer(self, lines: list[bytes]) -> None:
        with self._out_lock:
            try:
                self._out.write(b"".join(lines))
                self._out.flush()
            except (BrokenPipeError, ValueError):
                pass  # the agent is gone; its orders are not acknowledged


def serve(pending: str, threads: int, inp: BinaryIO, out: BinaryIO) -> None:
    steps = FileSteps(pending, threads, out)
    try:
        while True:
            header = inp.readline()
            if not header:
                return
            name, size = header.split()
            data = inp.read(int(size))
            if len(data) != int(size):
                return  # the agent died mid-frame: that order was never acknowledged
            steps.put(name.decode(), data)
    finally:
        steps.close()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(
            "usage: python -m agent.spool.file_proc PENDING_DIR THREADS AGENT_PID",
            file=sys.stderr,
        )
        return 2
    if not child_armed(int(argv[3]), READY):
        return 1
    serve(argv[1], int(argv[2]), sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
