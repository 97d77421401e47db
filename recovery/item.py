"""One order file on its way through the merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Item:
    """One order file on its way through the merge, and its place in its dedupe group."""

    file: str  # relative to DIR: "pending/S.json" or "x.json"
    loose: bool
    serial: str | None = None  # known once read (None: not read yet)
    key: str | None = None
    winner: str | None = None  # the serial that wins this item's dedupe key
    wins: bool = True
    pinned_to: str | None = None
    digest: bytes | None = None  # of a file read without its claim (held by the agent)

    @property
    def ref(self) -> str:
        """The serial, or before the file was read, what its name says."""
        if self.serial is not None:
            return self.serial
        return self.file if self.loose else Path(self.file).name.removesuffix(".json")
