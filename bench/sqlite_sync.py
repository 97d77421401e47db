"""Commit latency of a WAL-mode SQLite database: synchronous=NORMAL vs FULL.

    python bench/sqlite_sync.py [--commits 2000] [--rows 1,16] [--lazyfs] [DIR ...]

For each directory (default: a temp dir on the plain disk) and each synchronous
level, it commits ``--commits`` transactions of N journal-like rows (N from
``--rows``: 1 = one order per commit, 16 = a group commit under 16 clients) and
prints the median and p99 latency per commit and the commits per second.

``--lazyfs`` also measures on a LazyFS mount (shared/lazyfs, built and mounted
here, unmounted at exit). LazyFS's fsync only copies to its backing directory
and never fsyncs it, so its FULL figures understate a real disk's cost; the
plain-disk figures are the ones to plan with.

Why it matters: in WAL mode, NORMAL syncs the WAL only at checkpoints, so a
power cut loses every commit since the last one (kill -9 loses none); FULL
fsyncs the WAL at every commit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAZYFS = Path(os.environ.get("LAZYFS_DIR") or REPO.parent / "shared" / "lazyfs")

SCHEMA = """
CREATE TABLE orders (dedupe_key TEXT PRIMARY KEY, serial TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL, cluster TEXT, order_id TEXT, digest BLOB NOT NULL,
    received_at TEXT NOT NULL, updated_at REAL NOT NULL);
"""


def measure(directory: Path, sync: str, commits: int, rows: int) -> tuple[float, float, float]:
    path = directory / f"bench-{sync.lower()}-{rows}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        db.executescript(SCHEMA)
        lat = []
        n = 0
        for _ in range(commits):
            t0 = time.perf_counter()
            db.execute("BEGIN")
            for _ in range(rows):
                n += 1
                db.execute(
                    "INSERT INTO orders VALUES (?,?,?,?,?,?,?,?)",
                    (
                        f"douyin:{n}",
                        f"WH-SH-01-20261130-{n:09d}",
                        "forwarded",
                        "primary",
                        f"PR{n:08d}",
                        os.urandom(32),
                        "2026-11-30T10:00:00.000+08:00",
                        time.time(),
                    ),
                )
            db.execute("COMMIT")
            lat.append(time.perf_counter() - t0)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    lat.sort()
    return (statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99) - 1] * 1e3, len(lat) / sum(lat))


def mount_lazyfs(base: Path) -> tuple[Path, Path]:
    binary = (
        subprocess.run(
            ["bash", str(LAZYFS / "build.sh")], check=True, stdout=subprocess.PIPE, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    mnt, fifo = base / "mnt", base / "faults.fifo"
    env = dict(os.environ, LAZYFS_BIN=binary, LAZYFS_CACHE_SIZE="512MB")
    subprocess.run(
        ["bash", str(LAZYFS / "lazyfs-mount"), str(base / "root"), str(mnt), str(fifo)],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    return mnt, fifo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="*", type=Path)
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--rows", default="1,16")
    p.add_argument("--lazyfs", action="store_true")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="sqlite_sync_", dir="/tmp"))
    targets = [(str(d), d) for d in args.dirs] or [("plain disk " + str(tmp), tmp)]
    mnt = None
    try:
        if args.lazyfs:
            mnt, _ = mount_lazyfs(tmp / "lazyfs")
            targets.append(("LazyFS", mnt))
        print(
            f"{'where':<40} {'sync':<7} {'rows':>4} {'median ms':>10} {'p99 ms':>8} "
            f"{'commits/s':>10}"
        )
        for label, d in targets:
            for r in rows:
                for sync in ("NORMAL", "FULL"):
                    med, p99, rate = measure(d, sync, args.commits, r)
                    print(
                        f"{label[:40]:<40} {sync:<7} {r:>4} {med:>10.3f} {p99:>8.3f} {rate:>10.0f}",
                        flush=True,
                    )
    finally:
        if mnt is not None:
            subprocess.run(["bash", str(LAZYFS / "lazyfs-umount"), str(mnt)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
