"""Cost of a rename that never replaces: rename(2) vs renameat2(RENAME_NOREPLACE) vs link+unlink.

    python bench/noreplace.py [--files 20000] [DIR ...]

For each directory (default: a temp dir on the plain disk) it creates
``--files`` small files and moves each from a temp name to its final name in
another directory (as pending/ intake and the moves into merged/ do), once per
method, and prints the median and p99 microseconds per move. Files are neither
written nor fsynced here: this is the rename alone, the part the method changes
(an order's intake costs a file fsync and a share of a directory fsync besides,
milliseconds on a real disk).

The agent uses renameat2 where the filesystem takes the flag and falls back to
link+unlink where it answers EINVAL (FUSE filesystems such as LazyFS, NFS).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.base.syscalls import link_then_unlink, rename_noreplace

METHODS: dict[str, Callable[[str, str], None]] = {
    "rename": os.rename,
    "renameat2 NOREPLACE": rename_noreplace,
    "link+unlink": link_then_unlink,
}


def measure(base: Path, files: int, move: Callable[[str, str], None]) -> list[float]:
    src_dir, dst_dir = base / "src", base / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    for i in range(files):
        os.close(os.open(src_dir / f".{i}.json.tmp", os.O_CREAT | os.O_WRONLY, 0o600))
    times = []
    for i in range(files):
        src, dst = f"{src_dir}/.{i}.json.tmp", f"{dst_dir}/{i}.json"
        t0 = time.perf_counter_ns()
        move(src, dst)
        times.append((time.perf_counter_ns() - t0) / 1000)
    for name in os.listdir(dst_dir):
        os.unlink(dst_dir / name)
    os.rmdir(src_dir)
    os.rmdir(dst_dir)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("dirs", nargs="*", type=Path)
    args = ap.parse_args()
    dirs = args.dirs or [Path(tempfile.mkdtemp(prefix="bench-noreplace-"))]
    for d in dirs:
        print(f"{d} ({args.files} files):")
        for name, move in METHODS.items():
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                t = sorted(measure(Path(tmp), args.files, move))
            p99 = t[int(len(t) * 0.99)]
            print(f"  {name:22s} median {statistics.median(t):6.1f} us  p99 {p99:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
