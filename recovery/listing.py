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
from array import array
from collections.abc import Iterator
from pathlib import Path

from agent.spool.record import is_order_file


class SortedNames:
    """The order files of one directory, iterated in name (byte-wise string) order."""

    def __init__(self, directory: Path) -> None:
        self._by_prefix: dict[str, array[int]] = {}
        self._other: list[str] = []
        if directory.is_dir():
            self._list(directory)
        for counters in self._by_prefix.values():
            counters[:] = array("I", sorted(counters))
        self._other.sort()
        self.count = len(self._other) + sum(len(c) for c in self._by_prefix.values())

    def _list(self, directory: Path) -> None:
        # The hot loop of a million-file listing: plain string slicing, no regex, no calls
        # per entry. Every entry with an order file's name is listed, whatever it is: a
        # symlink is merged through, a FIFO or a directory is reported and moved aside
        # (agent.spool.reading), none is passed over in silence.
        by_prefix = self._by_prefix
        other = self._other
        with os.scandir(directory) as it:
            for entry in it:
                name = entry.name
                if not is_order_file(name):
                    continue
                digits = name[-14:-5]  # {prefix}{9 digits}.json, prefix ending in "-"
                if (
                    name[-15:-14] == "-"
                    and len(name) > 15
                    and digits.isdigit()
                    and digits.isascii()
                ):
                    prefix = name[:-14]
                    counters = by_prefix.get(prefix)
                    if counters is None:
                        counters = by_prefix[prefix] = array("I")
                    counters.append(int(digits))
                else:
                    other.append(name)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        streams: list[Iterator[str]] = [iter(self._other)]
        streams += [_named(prefix, counters) for prefix, counters in self._by_prefix.items()]
        return heapq.merge(*streams)


def _named(prefix: str, counters: array[int]) -> Iterator[str]:
    for n in counters:
        yield f"{prefix}{n:09d}.json"
