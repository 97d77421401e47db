"""The log writer: lines leave the caller at once, in order, and a reader that stays away
costs counted lines, never the caller's time or unbounded memory."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import orjson

from agent.logs import LogWriter

log = logging.getLogger("test.logwriter")


@dataclass
class Pipe:
    """A LogWriter on a pipe whose reader starts only when ``read()`` is called."""

    writer: LogWriter
    stream: TextIO
    read_fd: int
    chunks: list[bytes] = field(default_factory=list)
    reader: threading.Thread | None = None

    def read(self) -> None:
        fd = self.read_fd
        self.reader = threading.Thread(
            target=lambda: self.chunks.extend(iter(lambda: os.read(fd, 65536), b""))
        )
        self.reader.start()

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in b"".join(self.chunks).splitlines()]


@contextlib.contextmanager
def piped(max_lines: int = 100_000) -> Iterator[Pipe]:
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    pipe = Pipe(LogWriter(stream, max_lines=max_lines), stream, read_fd)
    log.setLevel(logging.INFO)
    before = logging.getLogger().handlers[:]
    try:
        yield pipe
    finally:
        logging.getLogger().handlers[:] = before
        if pipe.reader is None:
            pipe.read()  # lets a writer thread still blocked in a write finish
        stream.close()
        assert pipe.reader is not None
        pipe.reader.join(timeout=10)
        os.close(read_fd)


def test_a_stalled_reader_costs_counted_lines_not_the_caller() -> None:
    with piped(max_lines=100) as pipe:
        pipe.writer.start()
        started = time.monotonic()
        for n in range(3000):  # ~300 KB: the pipe (64 KiB) and the queue (100) fill up
            log.info("line %d", n, extra={"n": n})
        caller_s = time.monotonic() - started
        pipe.read()  # the reader comes back
        pipe.writer.stop()
    lines = pipe.lines()
    numbers = [int(str(line["n"])) for line in lines if "n" in line]
    dropped = [str(line["msg"]) for line in lines if "log lines dropped" in str(line["msg"])]
    assert caller_s < 5, "the caller waited for the reader"
    assert numbers == sorted(numbers) and numbers[0] == 0, "lines out of order"
    assert dropped, "lines were lost without a word"
    assert len(numbers) + sum(int(msg.split()[0]) for msg in dropped) == 3000


def test_stop_writes_every_queued_line() -> None:
    with piped() as pipe:
        pipe.read()
        with pipe.writer:
            for n in range(2000):
                log.info("line %d", n)
    assert [line["msg"] for line in pipe.lines()] == [f"line {n}" for n in range(2000)]


def test_stop_does_not_wait_past_its_timeout_for_a_stalled_reader() -> None:
    with piped(max_lines=100) as pipe:
        pipe.writer.start()
        for n in range(3000):  # the pipe and the queue are full: the writer is blocked
            log.info("line %d", n)
        started = time.monotonic()
        pipe.writer.stop(timeout_s=0.5)
        stopped_s = time.monotonic() - started
    assert stopped_s < 3, f"stop() waited {stopped_s:.1f}s for a reader that never came"
