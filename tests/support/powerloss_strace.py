"""Reading an ``strace -f -tt -T -yy`` log of the agent: which syscall, on which path or
socket, completed when.

LazyFS cannot see directory entries (create/rename/unlink reach its disk at once), so
the order of fsync, rename, directory fsync and reply is proven from the syscall trace
instead. Times are wall-clock microseconds from ``-tt``; a syscall's completion is its
entry time plus its ``-T`` duration (or the time of its ``<... resumed>`` line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# The list, plus unlink (a pending entry going), pwrite64 (SQLite writes its WAL
# with it) and recvfrom (when a request arrived).
TRACE_CALLS = (
    "openat,write,writev,pwrite64,sendto,sendmsg,recvfrom,fsync,fdatasync,rename,"
    "renameat,renameat2,syncfs,unlink,unlinkat"
)

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<ts>\d\d:\d\d:\d\d\.\d{6}) (?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>(?P<args>.*)$")
_RESULT = re.compile(
    # "= 13</the/file>": with -yy a returned descriptor is annotated too (openat)
    r"\)\s+=\s+(?P<ret>-?\d+|\?)(?:<[^>]*>)?(?: (?P<err>E[A-Z]+)[^<]*)?"
    r"(?:\s+<(?P<dur>\d+\.\d+)>)?\s*$"
)
_FD = re.compile(r"^(?P<fd>\d+)<(?P<what>.*?)>(?=[,)])")  # "TCP:[a:1->b:2]" has a '>'
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _seconds(ts: str) -> float:
    t = datetime.strptime(ts, "%H:%M:%S.%f")
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


@dataclass
class Call:
    pid: int
    name: str
    start: float
    end: float
    ok: bool
    fd_path: str  # -y annotation of the first argument, when it is an fd
    strings: list[str]  # quoted string arguments (paths, data), strace-escaped
    line: str

    def __repr__(self) -> str:
        return f"{self.name}@{self.start:.6f}-{self.end:.6f} {self.line[:160]}"


def parse(path: Path) -> list[Call]:
    """Every completed call in the trace, in order of entry."""
    calls: list[Call] = []
    pending: dict[tuple[int, str], tuple[float, str]] = {}
    for raw in path.read_text(errors="replace").splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, ts, rest = int(m["pid"]), _seconds(m["ts"]), m["rest"]
        if rest.startswith("+++") or rest.startswith("---"):
            continue
        resumed = _RESUMED.match(rest)
        if resumed:
            key = (pid, resumed["name"])
            if key not in pending:
                continue
            start, head = pending.pop(key)
            name, text, end_guess = resumed["name"], head + resumed["args"], ts
        else:
            call = _CALL.match(rest)
            if not call:
                continue
            if rest.endswith("<unfinished ...>"):
                head = call["args"].removesuffix("<unfinished ...>").rstrip()
                pending[(pid, call["name"])] = (ts, head)
                continue
            start, name, text, end_guess = ts, call["name"], call["args"], ts
        result = _RESULT.search(text)
        if result is None:
            continue
        dur = float(result["dur"]) if result["dur"] else 0.0
        end = max(end_guess, start + dur)
        fd = _FD.match(text)
        calls.append(
            Call(
                pid,
                name,
                start,
                end,
                result["ret"] not in ("-1", "?"),
                fd["what"] if fd else "",
                _STR.findall(text),
                raw,
            )
        )
    calls.sort(key=lambda c: c.start)
    return calls


def unescape(s: str) -> str:
    """Enough of strace's escaping to read JSON bodies and paths."""
    return s.replace('\\"', '"').replace("\\r", "\r").replace("\\n", "\n").replace("\\\\", "\\")
