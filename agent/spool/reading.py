"""Opening and reading order files: one cap, never blocking, regular files only.

Every reader of an order file comes through here: the agent's claims (drain,
start-up repair), the inbox, reconciliation, the SMS catch-up, and
edge-recover in every mode. What a careless hand can leave under a ``*.json``
name decides the rules:

- a FIFO (an open for reading would wait for a writer forever), a device, a
  socket, a directory: the open is ``O_NONBLOCK | O_NOCTTY``, ``fstat`` on
  the descriptor decides, and anything but a regular file is
  ``NotARegularFile``, never read;
- a 2 GB sparse file: the size is checked on the descriptor and at most
  ``cap + 1`` bytes are ever read (``TooLarge``);
- a file we may not read (root's 0600 as ``sudo cp`` leaves it), an I/O error,
  a symlink to nothing: ``UnreadableFile``, left where it is;
- a symlink to a regular file is read through, unless the caller refuses
  links (the agent's own pending/ holds none it wrote).

A file that vanished (moved by another process) is ``FileNotFoundError``, as
it always was. Everything here blocks; callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agent.errors import NotARegularFile, TooLarge, UnreadableFile

# The largest order file anyone reads: a pending record of a body at the agent's
# default 1 MiB limit is far below it; anything larger is not an order.
ORDER_FILE_CAP = 16 * 1024 * 1024

_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# Errors an open(2) gives for a special file (a socket, a device without a
# driver, a directory opened for writing) rather than for our permissions.
_SPECIAL_ERRNOS = frozenset({errno.ENXIO, errno.ENODEV, errno.EISDIR, errno.EOPNOTSUPP})


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words an operator knows."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: str | Path, mode: int) -> NotARegularFile:
    what = kind_of(mode)
    if stat.S_ISLNK(mode):
        with contextlib.suppress(OSError):
            what += f" to {os.readlink(path)!r} (left untouched)"
    return NotARegularFile(f"{path}: {what}, not a regular file (never opened for reading)")


def open_order_file(
    path: str | Path, writable: bool = False, follow_symlinks: bool = True
) -> tuple[int, os.stat_result, bool]:
    """(fd, fstat of it, opened writable?) of a regular file, without ever blocking.

    ``writable``: read-write where permitted, else read-only. Raises
    FileNotFoundError (gone), UnreadableFile or NotARegularFile.
    """
    flags = _FLAGS | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        try:
            fd = os.open(path, flags | (os.O_RDWR if writable else os.O_RDONLY))
        except OSError as exc:
            if not writable or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            fd, writable = os.open(path, flags | os.O_RDONLY), False
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableFile(
                f"{path}: a symbolic link to {os.readlink(path)!r}, which "
                "does not exist; fix or remove the link"
            ) from None
        raise
    except OSError as exc:
        raise _open_error(path, exc, follow_symlinks) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st, writable


def _open_error(
    path: str | Path, exc: OSError, follow_symlinks: bool
) -> UnreadableFile | NotARegularFile:
    if exc.errno in _SPECIAL_ERRNOS or (exc.errno == errno.ELOOP and not follow_symlinks):
        try:
            mode = os.lstat(path).st_mode if not follow_symlinks else os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            return not_regular(path, mode)
    return unreadable(path, exc)


def unreadable(path: str | Path, exc: OSError) -> UnreadableFile:
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        return UnreadableFile(
            f"{path}: cannot be read ({reason}) by uid {os.geteuid()}; "
            "fix its owner or mode, then run again"
        )
    return UnreadableFile(f"{path}: cannot be read ({reason}); left where it is")


def read_open(fd: int, st: os.stat_result, path: str | Path, cap: int = ORDER_FILE_CAP) -> bytes:
    """The content of the open regular file ``fd``: at most ``cap`` bytes, else TooLarge."""
    if st.st_size > cap:
        raise _too_large(path, st.st_size, cap)
    want = st.st_size + 1  # one read(2) for a file that does not grow meanwhile
    limit = cap + 1
    chunks = []
    try:
        while limit > 0 and (chunk := os.read(fd, min(want, limit))):
            chunks.append(chunk)
            limit -= len(chunk)
            want = 1 << 20
    except OSError as exc:
        raise unreadable(path, exc) from exc
    data = b"".join(chunks)
    if len(data) > cap:  # grew after the fstat
        raise _too_large(path, len(data), cap)
    return data


def _too_large(path: str | Path, size: int, cap: int) -> TooLarge:
    return TooLarge(f"{path}: {size} bytes, over the {cap}-byte limit for an order file", size, cap)


def load_order_file(
    path: str | Path, cap: int = ORDER_FILE_CAP, follow_symlinks: bool = True
) -> tuple[bytes, os.stat_result]:
    """(content, fstat) of one order file; see the module docstring for what it raises."""
    fd, st, _ = open_order_file(path, follow_symlinks=follow_symlinks)
    try:
        return read_open(fd, st, path, cap), st
    finally:
        os.close(fd)


def read_order_file(
    path: str | Path, cap: int = ORDER_FILE_CAP, follow_symlinks: bool = True
) -> bytes:
    """The content of one order file, read safely (the one way order files are read)."""
    return load_order_file(path, cap, follow_symlinks)[0]
