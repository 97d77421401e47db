"""One JSON object per line on stderr: what journald and log shippers want.

The lines are written on a thread of their own (``LogWriter``), never on the event
loop: a write to stderr blocks whenever its reader is slow (journald busy or rate
limiting, a full pipe, a log file on a disk that the buffer's fsyncs keep busy), and a
blocked event loop stops taking orders. Measured before the change: the write and flush
of each line on the loop took 13% of the loop's time during offline intake.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

import orjson

from agent.base.phones import mask_phones

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""  # "%Y-%m-%dT%H:%M:%S" of ``_second``: formatted once a second

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        doc: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # Phones are masked in every line, whatever logged them (CONTRACT 9).
        return mask_phones(orjson.dumps(doc, default=str).decode())


# Lines that may wait for the writer thread (~300 B each: ~30 MB). A reader that stays
# blocked past that costs lines (counted and reported), never the event loop or memory.
MAX_QUEUED_LINES = 100_000
_BATCH = 512  # lines joined into one write
STOP_TIMEOUT_S = 5.0


class _Enqueue(logging.handlers.QueueHandler):
    """Formats in the caller (the arguments are read while they are still what was
    logged) and queues the line; a full queue drops it and counts it."""

    def __init__(self, lines: queue.Queue[str | None]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(self.format(record))
        except queue.Full:
            self.dropped += 1
        except Exception:
            self.handleError(record)


class LogWriter:
    """Owns the thread that writes the log lines to ``stream``, several per write.

    ``start()`` routes the root logger through it; ``stop()`` writes what is queued and
    ends the thread (also as a context manager). A process that ends without ``stop()``
    (kill -9, ``os._exit``) loses the lines still queued: at most the last moments'.
    """

    def __init__(self, stream: TextIO, max_lines: int = MAX_QUEUED_LINES) -> None:
        self._stream = stream
        self._lines: queue.Queue[str | None] = queue.Queue(max_lines)
        self._handler = _Enqueue(self._lines)
        self._handler.setFormatter(JsonFormatter())
        self._thread: threading.Thread | None = None
        self._reported = 0

    def start(self) -> None:
        logging.getLogger().handlers[:] = [self._handler]
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Write what is queued, waiting at most ``timeout_s`` for a stalled reader: the
        lines it has not taken by then are lost, the exit is not held up."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):  # after every queued line
            self._lines.put(None, timeout=timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None  # a daemon: one still blocked in a write ends with the process
        # Whatever logs from here on (interpreter shutdown) is written at once.
        direct = logging.StreamHandler(self._stream)
        direct.setFormatter(JsonFormatter())
        logging.getLogger().handlers[:] = [direct]

    def __enter__(self) -> LogWriter:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write(self) -> None:
        get, get_nowait = self._lines.get, self._lines.get_nowait
        while True:
            lines = [get()]
            while lines[-1] is not None and len(lines) < _BATCH:
                try:
                    lines.append(get_nowait())
                except queue.Empty:
                    break
            last = lines[-1] is None
            text = [line for line in lines if line is not None]
            dropped = self._handler.dropped
            if dropped != self._reported:
                text.append(self._dropped_line(dropped - self._reported))
                self._reported = dropped
            if text:
                try:
                    self._stream.write("\n".join(text) + "\n")
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # nowhere to say it; the next lines try again
            if last:
                return

    @staticmethod
    def _dropped_line(count: int) -> str:
        record = logging.LogRecord(
            "agent.logs",
            logging.WARNING,
            "",
            0,
            "%d log lines dropped: stderr was not read for too long (its reader, e.g. "
            "journald, is stalled or rate limiting)",
            (count,),
            None,
        )
        return JsonFormatter().format(record)


def setup_logging(level: str = "info") -> LogWriter:
    """``level``: ``log.level`` from the config (debug, info, warning, error). Returns the
    writer, not yet started: run the process inside ``with`` it."""
    # What JsonFormatter never writes is not collected either (the logging HOWTO's
    # "Optimization"): the caller's file and line (a walk up the stack per record),
    # the thread and process names. ~11 us of the ~50 us a line cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    writer = LogWriter(sys.stderr)
    set_level(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Their debug lines are every SQL call and every file event: not what log.level
    # = "debug" is for (the agent's own decisions).
    for chatty in ("aiosqlite", "watchfiles"):
        logging.getLogger(chatty).setLevel(logging.INFO)
    return writer


def set_level(level: str) -> None:
    """The one place that turns ``log.level`` into the root logger's level (also on reload)."""
    logging.getLogger().setLevel(level.upper())
