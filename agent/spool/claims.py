"""One deliverer per file: an exclusive flock on a pending file (DESIGN invariant 6)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Claim:
    """An exclusive flock on one pending file: one deliverer per file.

    The kernel drops the lock when its holder dies, so a claim left by a
    killed process is recovered by simply trying again.
    """

    def __init__(self, path: str | Path, fd: int, data: bytes, writable: bool = False) -> None:
        # Kept as given: edge-recover claims a million files by str path, and a
        # pathlib.Path costs more to build than the claim's system calls.
        self.where = path
        self.data = data
        self.writable = writable
        self._fd: int | None = fd

    @property
    def path(self) -> Path:
        if not isinstance(self.where, Path):
            self.where = Path(self.where)
        return self.where

    @property
    def fd(self) -> int | None:
        return self._fd

    def replaced(self, fd: int, data: bytes) -> None:
        """The file was atomically replaced; ``fd`` is the new inode, already locked."""
        self.release()
        self._fd, self.data, self.writable = fd, data, False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_claim(path: str | Path, writable: bool = False) -> Claim | None:
    """Lock and read ``path``; None if it is gone or another process holds it.

    ``writable``: open it read-write where permitted, so the holder can add
    keys in place after moving it (edge-recover); read-only otherwise.
    """
    try:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except PermissionError:
            if not writable:
                raise
            fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder before us may have moved the file away while we waited.
        st = os.fstat(fd)
        try:
            same = os.stat(path).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        want = st.st_size + 1  # one read(2) for a file that does not grow meanwhile
        chunks = []
        while chunk := os.read(fd, want):
            chunks.append(chunk)
            if len(chunk) < want:
                break
            want = 1 << 20
        return Claim(path, fd, b"".join(chunks), writable)
    except BaseException:
        os.close(fd)
        raise
