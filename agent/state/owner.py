"""One agent per directory: an exclusive flock on ``DIR/.agent.lock``, held for life.

Two agents with one node_id on one buffer (a cloned VM, a second instance
started by hand) issue the same serials, and the second one's file replaces
the first one's acknowledged order. So ``buffer.path`` and ``agent.state_dir``
are each owned by one process: the lock is taken before anything is written
there and held on an fd until the process ends. The kernel drops a flock
with the last fd of its open file, so kill -9 or a power cut leave no stale
lock, only stale text, which the next owner overwrites.

The lock file holds the owner's identity (pid, node_id, host, since) so that
the agent refused names whom to stop. It is a dotfile without ``.json``:
never an order to the drain or to ``edge-recover``, whose own merge lock is a
flock on the directory itself (another inode: the two never meet).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pwd
import socket
from datetime import UTC, datetime
from pathlib import Path

import orjson

from agent.errors import DirectoryHeld, StartupError

LOCK_NAME = ".agent.lock"
log = logging.getLogger("agent.state")


class DirOwner:
    """Owns ``directory`` for this process from ``start()`` to ``stop()``."""

    def __init__(self, directory: str | Path, what: str, key: str, node_id: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._what = what  # "buffer", "state dir": for the message
        self._key = key  # the config key to change: "buffer.path", "agent.state_dir"
        self._node_id = node_id
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    async def start(self) -> None:
        await asyncio.to_thread(self.acquire)

    async def stop(self) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise DirectoryHeld naming the holder, StartupError if the
        directory cannot be used at all (blocks: a few syscalls)."""
        if self.held:
            return
        self.ensure_dir()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._unusable(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_all(fd))
            os.close(fd)
            raise DirectoryHeld(
                f"{self._what} {self.directory} is held by {holder}; stop that agent or "
                f"give this one its own {self._key}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            identity = (
                orjson.dumps(
                    {
                        "pid": os.getpid(),
                        "node_id": self._node_id,
                        "host": socket.gethostname(),
                        "since": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                )
                + b"\n"
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, identity, 0)
        except OSError as exc:  # the lock is what counts; the text only helps whom it refuses
            log.warning(
                "cannot write the owner's identity into %s: %s", self.path, exc.strerror or exc
            )

    def ensure_dir(self) -> None:
        """Create the directory (0700) if it is not there; StartupError if we cannot."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unusable(exc) from exc

    def _unusable(self, exc: OSError) -> StartupError:
        return unusable_directory(self._what, self.directory, self._key, exc)

    def release(self) -> None:
        """Give the directory up (the file stays: unlinking it would race a new owner)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


# A directory the agent's user cannot use for these reasons stays unusable until someone
# fixes the owner, the mode, the mount or the key: exit 2, systemd does not restart it.
_NEEDS_A_FIX = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.ELOOP, errno.EROFS}


def unusable_directory(
    what: str, directory: Path, key: str, exc: OSError, doing: str = "lock"
) -> StartupError:
    """The one line for a directory the agent cannot create, lock or write at start."""
    user = _user_name()
    if exc.errno in (errno.EACCES, errno.EPERM):
        hint = (
            f"user {user} may not write there: create it for that user (install -d -o {user} "
            f"-m 0700 {directory}), run the agent as the user that owns it, or point {key} at "
            f"a directory {user} may write (a trial: edge-agent sandbox --write-config DIR)"
        )
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = f"a file is in the way: point {key} at a directory"
    else:
        hint = "a directory the agent's user may write, on a healthy, mounted disk"
    return StartupError(
        f"cannot {doing} the {what} {directory}: {exc.strerror or exc}; check {key}: {hint}",
        exit_code=2 if exc.errno in _NEEDS_A_FIX else 1,
    )


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


async def own_all(owners: list[DirOwner]) -> list[DirOwner]:
    """Take every lock in order, or none: on failure the ones taken are released.

    Two owners of one directory (``agent.state_dir`` set to ``buffer.path``) would
    refuse each other (a flock belongs to an open file, not to a process), so a
    directory already held here is skipped. Returns the owners actually held.
    """
    held: list[DirOwner] = []
    try:
        for owner in owners:
            await asyncio.to_thread(owner.ensure_dir)
            if any(os.path.samefile(owner.directory, h.directory) for h in held):
                continue
            await owner.start()
            held.append(owner)
    except BaseException:
        for owner in held:
            owner.release()
        raise
    return held


def _read_all(fd: int) -> bytes:
    with contextlib.suppress(OSError):
        return os.pread(fd, 4096, 0)
    return b""


def _describe(data: bytes) -> str:
    """ "pid 1234 (node wh-sh-01 on host X since ...)" from the lock file's text."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or "pid" not in doc:
        return "another process (it has not written its identity yet)"
    return (
        f"pid {doc.get('pid')} (node {doc.get('node_id')} on host {doc.get('host')} "
        f"since {doc.get('since')})"
    )
