"""One JSON object per line on stderr: what journald and log shippers want."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

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


def setup_logging(level: str = "info") -> None:
    """``level``: ``log.level`` from the config (debug, info, warning, error)."""
    # What JsonFormatter never writes is not collected either (the logging HOWTO's
    # "Optimization"): the caller's file and line (a walk up the stack per record),
    # the thread and process names. ~11 us of the ~50 us a line cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Their debug lines are every SQL call and every file event: not what log.level
    # = "debug" is for (the agent's own decisions).
    for chatty in ("aiosqlite", "watchfiles"):
        logging.getLogger(chatty).setLevel(logging.INFO)


def set_level(level: str) -> None:
    """The one place that turns ``log.level`` into the root logger's level (also on reload)."""
    logging.getLogger().setLevel(level.upper())
