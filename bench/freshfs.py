"""A fresh ext4 filesystem for one bench run: a sparse image, mkfs.ext4, a loop mount.

Each intake run creates and deletes ~30,000 files, and ext4 then scans the freed
inodes at every create: on one long-lived filesystem a run is slower than the run
before it whatever its code (issue 23, round 3: one naive writer went from 1,442 to
491 files/s over four runs, and old/new comparisons followed the order of the runs).
A filesystem made for the run puts every run, old code or new, on the same footing;
the naive writers and the agent share it, so their ratio stays the fair one. Its
device is a loop device over a file on the host's disk: absolute rates are that
stack's, not the bare disk's. Needs root (mount) and mkfs.ext4.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class FreshFsError(Exception):
    """The filesystem could not be made or mounted: what failed and what to do."""


@contextlib.contextmanager
def fresh_ext4(parent: str | None, size_gib: int = 4, inodes: int | None = None) -> Iterator[Path]:
    """Mount a new, empty ext4 of ``size_gib`` (sparse) under ``parent``; yield its root.
    ``inodes``: at least this many (mkfs's default, one per 16 KiB, is 262,144 for 4 GiB:
    too few for a million order files)."""
    if os.geteuid() != 0:
        raise FreshFsError("--fresh-fs loop-mounts an image and needs root; run without it")
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        raise FreshFsError("--fresh-fs needs mkfs.ext4 (Debian: e2fsprogs)")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-fs-", dir=parent))
    image, mnt = work / "ext4.img", work / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_gib << 30)
        _run(mkfs, "-q", "-F", *(("-N", str(inodes)) if inodes else ()), str(image))
        _run("mount", "-o", "loop", str(image), str(mnt))
        mounted = True
        yield mnt
    finally:
        if mounted:
            _run("umount", str(mnt))
        shutil.rmtree(work, ignore_errors=True)


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FreshFsError(
            f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip() or done.stdout}"
        )
