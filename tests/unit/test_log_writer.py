"""The log writer: lines leave the caller at once, in order, and a reader that stays away
costs counted lines, never the caller's time or unbounded memory."""

from __future__ import annotations

import logging
import os
import threading
import time

import orjson

from agent.logs import LogWriter


def test_a_stalled_reader_costs_counted_lines_not_the_caller() -> None:
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    writer = LogWriter(stream, max_lines=100)
    log = logging.getLogger("test.logwriter")
    log.setLevel(logging.INFO)
    before = logging.getLogger().handlers[:]
    writer.start()
    try:
        started = time.monotonic()
        for n in range(3000):  # ~300 KB: the pipe (64 KiB) and the queue (100) fill up
            log.info("line %d", n, extra={"n": n})
        caller_s = time.monotonic() - started
        chunks: list[bytes] = []
        reader = threading.Thread(
            target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b""))
        )
        reader.start()  # the reader comes back
    finally:
        writer.stop()
        stream.close()
        logging.getLogger().handlers[:] = before
    reader.join(timeout=10)
    os.close(read_fd)
    lines = [orjson.loads(line) for line in b"".join(chunks).splitlines()]
    numbers = [line["n"] for line in lines if "n" in line]
    dropped = [line for line in lines if "log lines dropped" in line["msg"]]
    assert caller_s < 5, "the caller waited for the reader"
    assert numbers == sorted(numbers) and numbers[0] == 0, "lines out of order"
    assert dropped, "lines were lost without a word"
    counted = sum(int(line["msg"].split()[0]) for line in dropped)
    assert len(numbers) + counted == 3000


def test_stop_writes_every_queued_line() -> None:
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    writer = LogWriter(stream)
    log = logging.getLogger("test.logwriter")
    log.setLevel(logging.INFO)
    before = logging.getLogger().handlers[:]
    chunks: list[bytes] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b""))
    )
    reader.start()
    with writer:
        for n in range(2000):
            log.info("line %d", n)
    stream.close()
    logging.getLogger().handlers[:] = before
    reader.join(timeout=10)
    os.close(read_fd)
    msgs = [orjson.loads(line)["msg"] for line in b"".join(chunks).splitlines()]
    assert msgs == [f"line {n}" for n in range(2000)]


def test_stop_does_not_wait_past_its_timeout_for_a_stalled_reader() -> None:
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    writer = LogWriter(stream, max_lines=100)
    log = logging.getLogger("test.logwriter")
    log.setLevel(logging.INFO)
    before = logging.getLogger().handlers[:]
    writer.start()
    try:
        for n in range(3000):  # the pipe and the queue are full: the writer is blocked
            log.info("line %d", n)
        started = time.monotonic()
        writer.stop(timeout_s=0.5)
        stopped_s = time.monotonic() - started
    finally:
        logging.getLogger().handlers[:] = before
        drain = threading.Thread(target=lambda: list(iter(lambda: os.read(read_fd, 65536), b"")))
        drain.start()  # lets the blocked writer thread finish
        stream.close()
        drain.join(timeout=10)
        os.close(read_fd)
    assert stopped_s < 3, f"stop() waited {stopped_s:.1f}s for a reader that never came"
