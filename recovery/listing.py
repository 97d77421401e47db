"""pending/ in name order, listed once, held compactly.

The agent names a pending file by its serial (``{NODE}-{YYYYMMDD}-{counter}.json``),
so name order is serial order, and the first file of a dedupe key met in name
order is the lowest serial of that key in pending/: the merge can rank groups
as it goes, and send the first order at once instead of reading every file
first. A million names as ``str`` would cost ~90 MB; agent names are kept as
one counter per file (4 bytes) under their shared ``{NODE}-{DAY}`` prefix, and
only other names (copied in by hand, renamed) as strings.
"""

from __future__ import annotations

import heapq
import os
import re
from array import array
from collections import deque
from collections.abc import Iterator
from itertools import compress, islice, repeat
from operator import sub
from pathlib import Path

from agent.spool.record import is_order_file

# Names handed to the bulk steps per pass: bounds the strings held at once (~5 MB).
CHUNK = 65536
# A prefix's counters are sorted by marking them in a byte map when their span is at
# most this many bytes per counter (a few MB for a million dense serials), else sorted().
_SPAN_PER_COUNTER = 8


class SortedNames:
    """The order files of one directory, iterated in name (byte-wise string) order."""

    def __init__(self, directory: Path) -> None:
        self._by_prefix: dict[str, array[int]] = {}
        self._other: list[str] = []
        if directory.is_dir():
            self._list(directory)
        for prefix, counters in self._by_prefix.items():
            self._by_prefix[prefix] = _sorted(counters)
        self._other.sort()
        self.count = len(self._other) + sum(len(c) for c in self._by_prefix.values())

    def _list(self, directory: Path) -> None:
        # A million names: per name, Python costs a microsecond or two, so the names go
        # through C in chunks. Each chunk is joined with NULs (the one byte no file name
        # holds), and each agent prefix met so far takes its counters out with one regex
        # pass; the names left (rare: a new prefix, names copied in by hand) go one by
        # one through ``_one``, the rule itself. Every entry with an order file's name is
        # listed, whatever it is: a symlink is merged through, a FIFO or a directory is
        # reported and moved aside (agent.spool.reading), none is passed over in silence.
        patterns: dict[str, re.Pattern[str]] = {}
        with os.scandir(directory) as it:
            while names := [entry.name for entry in islice(it, CHUNK)]:
                text, left = "\0".join(names), len(names)
                for prefix, pattern in patterns.items():
                    if prefix in text:
                        digits = pattern.findall(text)
                        self._by_prefix[prefix].extend(map(int, digits))
                        left -= len(digits)
                        if not left:
                            break
                        if digits:
                            text = pattern.sub("", text)
                if not left:
                    continue
                for name in text.split("\0"):
                    met = self._one(name) if name else None
                    if met is not None and met not in patterns:
                        patterns[met] = re.compile(
                            f"(?<![^\\0]){re.escape(met)}([0-9]{{9}})\\.json(?![^\\0])"
                        )

    def _one(self, name: str) -> str | None:
        """List one name: an agent name (``{prefix}{9 digits}.json``, the prefix ending
        in "-") under its prefix, which is returned, any other order file's as it is."""
        if not is_order_file(name):
            return None
        digits = name[-14:-5]
        if name[-15:-14] == "-" and len(name) > 15 and digits.isdigit() and digits.isascii():
            prefix = name[:-14]
            counters = self._by_prefix.get(prefix)
            if counters is None:
                counters = self._by_prefix[prefix] = array("I")
            counters.append(int(digits))
            return prefix
        self._other.append(name)
        return None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        streams: list[Iterator[str]] = [iter(self._other)]
        streams += [_named(prefix, counters) for prefix, counters in self._by_prefix.items()]
        return heapq.merge(*streams)


def _sorted(counters: array[int]) -> array[int]:
    """The counters in order. A prefix's counters are distinct (one file per name) and
    mostly dense (serials are issued in blocks), so a byte map over their span sorts a
    million of them in C loops in a fraction of sorted()'s time."""
    if not counters:
        return counters
    low, high = min(counters), max(counters)
    span = high - low + 1
    if span > _SPAN_PER_COUNTER * len(counters) + CHUNK:
        return array("I", sorted(counters))
    seen = bytearray(span)
    deque(map(seen.__setitem__, map(sub, counters, repeat(low)), repeat(1)), maxlen=0)
    return array("I", compress(range(low, high + 1), seen))


def _named(prefix: str, counters: array[int]) -> Iterator[str]:
    for n in counters:
        yield f"{prefix}{n:09d}.json"
