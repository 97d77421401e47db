"""LazyFS control for the power-loss suite: build, mount, clear-cache, faults, unmount.

LazyFS (shared/lazyfs, vendored) shows ROOT at MNT and keeps written data in its
own cache until fsync; ``lazyfs::clear-cache`` drops every unsynced byte, which is
what a power cut does. create/rename/unlink/mkdir go straight to ROOT, so a missing
*directory* fsync is invisible here: tests/system/test_fsync_order.py proves that part.

The shared directory is found at ``$LAZYFS_DIR``, else ``<repo>/../shared/lazyfs``
(CI checks out shared/ next to the repository; in a worktree /work/wtN that is
/work/shared/lazyfs). Paths handed to LazyFS never contain "-o" (its argument
parser misreads them), so everything lives under ``tempfile.mkdtemp()``.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import host_tools

REPO = Path(__file__).resolve().parents[2]
LAZYFS_DIR = Path(os.environ.get("LAZYFS_DIR") or REPO.parent / "shared" / "lazyfs")
# Bytes written between two clear-caches stay far below this (checked at every cut).
CACHE_SIZE = os.environ.get("POWERLOSS_LAZYFS_CACHE", "256MB")


def unavailable_reason() -> str | None:
    """Why the suite cannot run here, or None. With POWERLOSS_REQUIRED=1 (CI) the suite
    never skips: a missing prerequisite fails it instead."""
    if host_tools.required():
        return None
    if os.geteuid() != 0:
        return "LazyFS needs root (allow_other, /dev/fuse)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing: no FUSE"
    if not (LAZYFS_DIR / "lazyfs-mount").exists():
        return f"LazyFS scripts not found at {LAZYFS_DIR} (set LAZYFS_DIR)"
    if shutil.which("fusermount3") is None and not (LAZYFS_DIR / "build.sh").exists():
        return "fusermount3 missing"
    return None


def build() -> str:
    """build.sh (a no-op when up to date); the lazyfs binary path."""
    out = subprocess.run(
        ["bash", str(LAZYFS_DIR / "build.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=900,
    ).stdout
    return out.strip().splitlines()[-1]


def is_mounted(mnt: Path) -> bool:
    r = subprocess.run(
        ["findmnt", "-rn", "--mountpoint", str(mnt), "-o", "FSTYPE"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return r.stdout.strip().startswith("fuse")


class LazyFs:
    """One LazyFS mount: ``root`` is the disk, ``mnt`` what the agent sees."""

    def __init__(self, binary: str, short: bool = False) -> None:
        """``short``: the shortest paths (/tmp/tXXXXXXXX/r), for faults that name a whole
        path in a FIFO command of under 100 bytes (torn-op)."""
        self.binary = binary
        self.base = Path(tempfile.mkdtemp(prefix="t" if short else "powerloss_", dir="/tmp"))
        assert "-o" not in str(self.base), self.base
        self.root = self.base / ("r" if short else "root")
        self.mnt = self.base / ("m" if short else "mnt")
        self.fifo = self.base / "faults.fifo"
        self.log = Path(f"{self.fifo}.log")
        self.pid: int | None = None
        self.mounts = 0

    # -- mount / unmount ---------------------------------------------------------------

    def mount(self) -> None:
        env = dict(os.environ, LAZYFS_BIN=self.binary, LAZYFS_CACHE_SIZE=CACHE_SIZE)
        out = subprocess.run(
            [
                "bash",
                str(LAZYFS_DIR / "lazyfs-mount"),
                str(self.root),
                str(self.mnt),
                str(self.fifo),
            ],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=90,
        ).stdout
        self.pid = int(out.strip().splitlines()[-1])
        self.mounts += 1
        # LazyFS's fault worker opens FIFO.done for writing before it reads any command,
        # so it starts only once a reader has opened FIFO.done: a first clear-cache
        # (nothing is cached yet) gets it going and proves the FIFO works.
        self.clear_cache()

    def umount(self) -> bool:
        """Unmount (also a mount whose lazyfs crashed); True when it is gone."""
        args = ["bash", str(LAZYFS_DIR / "lazyfs-umount"), str(self.mnt)]
        if self.pid:
            args.append(str(self.pid))
        try:
            ok = subprocess.run(args, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if not ok and is_mounted(self.mnt):  # last resort: never leave a FUSE mount behind
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.pid = None
        return not is_mounted(self.mnt)

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def remount(self) -> None:
        """After a crash fault: lazyfs-umount + lazyfs-mount (unsynced data is lost)."""
        self.umount()
        self.mount()

    def ensure_mounted(self) -> None:
        if not (self.alive() and is_mounted(self.mnt)):
            self.remount()

    def destroy(self) -> None:
        self.umount()
        if not is_mounted(self.mnt):
            shutil.rmtree(self.base, ignore_errors=True)

    # -- commands ------------------------------------------------------------------------

    def command(self, cmd: str) -> None:
        """One fault command (< 100 bytes, no ack)."""
        assert len(cmd) < 100, cmd
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, (cmd + "\n").encode())
        finally:
            os.close(fd)

    def clear_cache(self, timeout: float = 60.0) -> None:
        """``lazyfs::clear-cache`` and wait for its ack (the reader opens first)."""
        rfd = os.open(f"{self.fifo}.done", os.O_RDONLY | os.O_NONBLOCK)
        try:
            self.command("lazyfs::clear-cache")
            buf, end = b"", time.monotonic() + timeout
            while b"finished::clear-cache" not in buf:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no clear-cache ack on {self.fifo}.done")
                if select.select([rfd], [], [], left)[0]:
                    chunk = os.read(rfd, 4096)
                    if not chunk:
                        time.sleep(0.01)
                    buf += chunk
        finally:
            os.close(rfd)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def cache_usage_pct(self, timeout: float = 5.0) -> float:
        """``display-cache-usage``: the cache's fill level in percent (from the log)."""
        before = len(self.log_text())
        self.command("lazyfs::display-cache-usage")
        end = time.monotonic() + timeout
        pat = re.compile(r"usage[^\n]*?([0-9.]+)\s*%", re.IGNORECASE)
        while time.monotonic() < end:
            m = pat.search(self.log_text()[before:])
            if m:
                return float(m.group(1))
            time.sleep(0.05)
        raise AssertionError(
            "no cache usage line in the LazyFS log: " + self.log_text()[before:][-500:]
        )

    def crash_fault(self, spec: str) -> None:
        """Arm a ``lazyfs::crash::...`` or ``lazyfs::torn-op::...`` fault; wait until valid."""
        before = len(self.log_text())
        self.command(spec)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            text = self.log_text()[before:]
            if "INVALID" in text:
                raise AssertionError(f"LazyFS refused the fault {spec!r}: {text[-600:]}")
            if "configured successfully" in text or "VALID crash fault" in text:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"LazyFS did not confirm the fault {spec!r}: " + self.log_text()[before:][-600:]
        )

    def fault_fired(self) -> bool:
        return "Killing LazyFS" in self.log_text() or not self.alive()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_durably(directory: Path, name: str, data: bytes) -> None:
    """What a well-behaved local producer does to place a file in inbox/."""
    tmp = directory / f".{name}.part"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, directory / name)
    with contextlib.suppress(OSError):
        fsync_path(directory)
