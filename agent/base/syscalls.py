"""The two system calls the buffer needs that Python's os module lacks, through libc.

- ``sync_filesystem``: syncfs(2), one call for a batch of files (sync(2) elsewhere);
- ``rename_noreplace``: renameat2(2) with RENAME_NOREPLACE, so that no move into
  pending/, merged/ or rejected/ ever replaces an order file (DESIGN 10). Where
  the filesystem refuses the flag (EINVAL: a FUSE filesystem such as LazyFS,
  NFS, older kernels) the same result comes from link(2) + unlink(2);
- ``dies_with_parent``: prctl(2) PR_SET_PDEATHSIG, for child processes that must
  not outlive the process that started them.

Both block; callers run them in a thread (ctypes releases the GIL meanwhile).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AT_FDCWD = -100
SELF_EXE = "/proc/self/exe"
RENAME_NOREPLACE = 1
# renameat2 itself is missing (ENOSYS) or the filesystem does not take the flag.
_NO_RENAMEAT2 = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Move ``src`` to ``dst`` unless ``dst`` exists: then FileExistsError, both untouched.

    Atomic with renameat2. The link/unlink fallback has one difference: a crash
    between the two steps leaves the file under both names, which every caller
    already meets after a crash (a stale temp file is removed at start-up; an
    order in pending/ and in merged/ is recognised as merged).
    """
    if _RENAMEAT2 is not None:
        if (
            _RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
            == 0
        ):
            return
        err = ctypes.get_errno()
        if err not in _NO_RENAMEAT2:
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    link_then_unlink(src, dst)


def link_then_unlink(src: str | Path, dst: str | Path) -> None:
    """rename_noreplace where renameat2 cannot: link(2) fails with EEXIST like it."""
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def sync_filesystem(path: Path) -> None:
    """Make every write on ``path``'s filesystem durable (syncfs(2); sync(2) elsewhere).

    One call replaces thousands of per-file fsyncs when a batch of files was
    written; like fsync it returns only once the data and the directory entries
    are on disk.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC is not None and _LIBC.syncfs(fd) == 0:
            return
        if _LIBC is not None and ctypes.get_errno() not in (errno.ENOSYS, 0):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        os.sync()
    finally:
        os.close(fd)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _load_renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+), or None: then link(2) + unlink(2) stand in."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_LIBC = _load_libc()
_RENAMEAT2 = _load_renameat2()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def dies_with_parent() -> Callable[[], None]:
    """For a child: SIGKILL when the process that started it ends, however it ends (a
    second Ctrl-C, kill -9), so that no drill agent outlives its sandbox and no pending/
    writer outlives its agent. Call the result in the child (``preexec_fn``, or first
    thing after start, then check ``os.getppid()``); the function is looked up here,
    before the fork. The kernel sends it when the *thread* that started the child ends:
    start such children from the event loop's thread, never from asyncio.to_thread."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return arm


# The directory this ``agent`` package was imported from (site-packages, or a checkout
# run with ``python -m``): a child process runs the very code its parent runs.
CODE_ROOT = str(Path(__file__).resolve().parents[2])


def child_code(module: str) -> str:
    """``python -P -c`` code that runs ``module``'s ``main(sys.argv)`` from CODE_ROOT,
    with ``{root}`` left for ``str.format``."""
    return (
        "import sys; r = {root!r}; r in sys.path or sys.path.insert(0, r); "
        f"from {module} import main; sys.exit(main(sys.argv))"
    )


def own_executable() -> str | None:
    """For ``executable=`` of a child Python: the very binary this process runs, whatever
    the path it was started by. A user may have been given a python it can run but not
    look up again (seen: a venv whose interpreter lies under a 0700 home); argv[0] stays
    sys.executable, so the child finds the same venv and site-packages."""
    return SELF_EXE if os.path.exists(SELF_EXE) else None


def child_armed(parent_pid: int, ready: bytes) -> bool:
    """For a child process that serves its parent over stdin and stdout (the pending/
    writer, edge-recover's mover): ignore SIGTERM, SIGINT and SIGHUP (systemd and a
    terminal signal the whole group; the parent decides when its child ends, by closing
    its stdin), die with the parent, then say ``ready`` on stdout. False, and nothing
    said, if the parent ended before the signal was armed: nobody to answer."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    dies_with_parent()()
    if os.getppid() != parent_pid:
        return False
    sys.stdout.buffer.write(ready)  # armed: from here it cannot outlive its parent
    sys.stdout.buffer.flush()
    return True
