"""One deliverer per file: an exclusive flock on a pending file (DESIGN invariant 6)."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from agent.spool.reading import ORDER_FILE_CAP, open_order_file, read_open


class Claim:
    """An exclusive flock on one pending file: one deliverer per file.

    The kernel drops the lock when its holder dies, so a claim left by a
    killed process is recovered by simply trying again.
    """

    def __init__(
        self,
        path: str | Path,
        fd: int | None,
        data: bytes,
        writable: bool = False,
        inode: tuple[int, int] | None = None,
    ) -> None:
        # Kept as given: edge-recover claims a million files by str path, and a
        # pathlib.Path costs more to build than the claim's system calls.
        self.where = path
        self.data = data
        self.writable = writable
        # ``where`` is a symlink and the lock is on its target: the target is not ours
        # to move or change (another buffer's only copy, or the agent's own file).
        self.linked = False
        self._fd: int | None = fd
        # (st_ino, st_dev) of the locked file: who acts on it by path checks it is still it.
        self.inode = inode

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
        st = os.fstat(fd)
        self._fd, self.data, self.writable = fd, data, False
        self.inode = (st.st_ino, st.st_dev)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_claim(
    path: str | Path,
    writable: bool = False,
    follow_symlinks: bool = True,
    cap: int = ORDER_FILE_CAP,
) -> Claim | None:
    """Lock and read ``path``; None if it is gone or another process holds it.

    ``writable``: open it read-write where permitted, so the holder can add
    keys in place after moving it (edge-recover); read-only otherwise. The open
    follows ``agent.spool.reading`` (never blocks, regular files only, at most
    ``cap`` bytes): UnreadableFile, NotARegularFile and TooLarge say why a file
    cannot be claimed. ``follow_symlinks=False`` refuses a link (NotARegularFile);
    otherwise the lock is on the link's target and ``Claim.linked`` is set.
    """
    try:
        fd, st, writable = open_order_file(path, writable, follow_symlinks)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder before us may have moved the file away while we waited.
        try:
            now = os.lstat(path)
            linked = stat.S_ISLNK(now.st_mode)
            if linked:
                now = os.stat(path)
            same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)
        except FileNotFoundError:
            same = linked = False
        if not same:
            os.close(fd)
            return None
        claim = Claim(path, fd, read_open(fd, st, path, cap), writable, (st.st_ino, st.st_dev))
        claim.linked = linked
        return claim
    except BaseException:
        os.close(fd)
        raise
