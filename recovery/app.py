"""The three modes, wired: merge, dry-run and verify. Each returns the exit code.

Exit codes (CONTRACT section 6): 0 all fine; 1 some orders rejected,
conflicting, missing or left unmerged (listed in the report); 2 usage or
config (decided in cli.py); 3 the target is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.delivery.targets import normalize_url
from agent.errors import UpstreamError
from agent.limits import raise_fd_limit
from agent.spool.files import remove_stale_temps
from agent.spool.mover import MoverProcess
from agent.spool.record import BufferDirs
from agent.upstream.client import UpstreamClient
from agent.upstream.dns import ClusterResolver
from recovery.checkpoint import CHECKPOINT_NAME, UNREADABLE, Checkpoint
from recovery.finisher import FileMoves, Finisher, Outcomes, Settled
from recovery.merge import MergeOptions, Merger
from recovery.origin import Source
from recovery.plan import Plan
from recovery.progress import Progress
from recovery.ranking import Ranker
from recovery.report import Summary, write_report
from recovery.sender import Sender
from recovery.source import Found, admitted, scan
from recovery.verify import Verifier, count_merged

log = logging.getLogger("recovery")

EXIT_OK, EXIT_ORDERS, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
VERIFY_OUTCOMES = ("ok", "missing", "different", "unreadable", "error")


@dataclass(frozen=True)
class Job:
    root: Path
    mode: str
    target: str
    node: str
    timeout_s: float
    concurrency: int = 32
    nameservers: tuple[str, ...] = ()
    rate: float | None = None
    batch: int = 100
    report: Path | None = None
    held_wait_s: float = 30.0
    cluster: str | None = None  # the target's configured cluster: pinned orders of others stay
    clusters: tuple[tuple[str, str], ...] = ()  # (name, URL) from the config, for advice

    @property
    def pin(self) -> str:
        """What an unclear answer pins an order to: the target's cluster, else its URL, so
        that the order is sent nowhere else (CONTRACT 5)."""
        return self.cluster or normalize_url(self.target) or self.target


def _target_line(job: Job, addresses: dict[str, str | None]) -> str:
    """Where the orders go, and what its health check said, before anything is done."""
    name = f"cluster {job.cluster}" if job.cluster else "not a configured cluster"
    healthy = [a for a, e in addresses.items() if e is None]
    line = f"target {job.target} ({name}): healthy at {', '.join(healthy)}"
    sick = [f"{a}: {e}" for a, e in addresses.items() if e is not None]
    return line + (f"; unhealthy at {'; '.join(sick)}" if sick else "")


class AlreadyRunning(Exception):
    """Another edge-recover merge holds DIR."""


@dataclass(frozen=True)
class Origin:
    """Where a merge's orders come from and go back to, when not a buffer directory (the
    replica): the engine, the checkpoint in ``job.root`` and the report stay the same."""

    source: Source
    outcomes: Outcomes
    args: str  # what names this source on the command line, for the advice printed


async def run(job: Job, origin: Origin | None = None) -> int:
    raise_fd_limit()
    client = UpstreamClient(
        f"recover-{job.node}".lower()[:32],
        ClusterResolver(job.nameservers, job.timeout_s),
        max_connections=job.concurrency,
    )
    await client.start()
    try:
        try:
            addresses = await client.check_health(job.target, job.timeout_s)
        except UpstreamError as exc:
            log.error("target %s is unreachable: %s", job.target, exc)
            return EXIT_UNREACHABLE
        if not any(error is None for error in addresses.values()):
            log.error(
                "target %s is unreachable: %s",
                job.target,
                "; ".join(str(e) for e in addresses.values()),
            )
            return EXIT_UNREACHABLE
        print(f"edge-recover {job.mode}: {_target_line(job, addresses)}", flush=True)
        if job.mode == "verify":
            return await _verify(job, client)
        if job.mode == "dry-run":
            return await asyncio.to_thread(_dry_run, job)
        with _merge_lock(job.root):
            return await _merge(job, client, origin)
    finally:
        await client.stop()


async def _merge(job: Job, client: UpstreamClient, origin: Origin | None) -> int:
    dirs = BufferDirs(job.root)
    for d in (dirs.merged, dirs.rejected):
        d.mkdir(mode=0o700, exist_ok=True)
    remove_stale_temps(dirs.merged)
    summary = Summary("merge", job.target)
    problems: list[str] = []  # files that are no usable order, named after the summary
    ck_path = job.root / CHECKPOINT_NAME
    checkpoint = Checkpoint(ck_path, run=time_ms())
    stop = stop_event()
    ranker = Ranker(ck_path)
    # The claims (which rank) and the checkpoint take turns on one thread, the moves are
    # the mover process's (recovery/finisher.py says why).
    files = ThreadPoolExecutor(1, thread_name_prefix="merge-files")
    try:
        sender = Sender(
            client, job.target, job.concurrency, job.rate, job.batch, job.timeout_s, stop
        )
        progress: Progress | None = None

        def settled(items: list[Settled]) -> None:
            for item in items:
                summary.add(item.row.outcome)
                if item.row.outcome in TO_REVIEW:
                    problems.append(_problem(item.row.outcome, item.row.file, item.row.error))
                if item.error:
                    summary.extra["not_moved"] = summary.extra.get("not_moved", 0) + 1
            if progress is not None:
                progress.update(len(items))

        if origin is None:
            mover = MoverProcess()
            mover.start()  # here, on the event loop's thread: it dies with this one
            outcomes: Outcomes = FileMoves(dirs, files, mover)
        else:
            outcomes = origin.outcomes
        finisher = Finisher(dirs, checkpoint, settled, outcomes=outcomes, files=files)
        opts = MergeOptions(
            job.root,
            job.target,
            job.node,
            job.concurrency,
            job.batch,
            job.held_wait_s,
            job.cluster,
            job.pin,
        )
        merger = Merger(
            opts, ranker, sender, finisher, stop, files, None if origin is None else origin.source
        )
        summary.total = await merger.prepare()
        log.info(
            "%d order files listed in %.1fs; merging into %s",
            summary.total,
            time.monotonic() - summary.started,
            job.target,
        )
        progress = Progress(summary.total, "merge")
        finisher.start()
        try:
            await merger.run()
        finally:
            await finisher.stop()
            progress.update(len(merger.held_elsewhere))
            progress.close()
    finally:
        files.shutdown(wait=True)  # no claim may rank after the ranker is closed
        ranker.close()
    held = merger.held_elsewhere
    summary.total -= len(held)
    summary.finish()
    summary.extra.update(
        requests=sender.requests, bulk=bool(sender.bulk), interrupted=stop.is_set()
    )
    _report_held(job, held, summary, None if origin is None else origin.args)
    if job.report is not None:
        write_report(job.report, summary.as_dict(), "orders", checkpoint.entries(checkpoint.run))
    c = summary.counts
    left = summary.total - summary.done + c["pending"] + len(held)
    clean = not (
        stop.is_set()
        or merger.gave_up
        or c["rejected"]
        or c["conflict"]
        or c[UNREADABLE]
        or left
        or summary.extra.get("not_moved")
    )
    if clean:
        checkpoint.discard()
    else:
        checkpoint.close()
    print(f"edge-recover merge: {summary.line()}", flush=True)
    if problems:
        print(
            f"  {len(problems)} files to review (moved to {dirs.rejected} with a .reason.json, "
            "or left where they are if unreadable):",
            flush=True,
        )
    _print_problems(problems, len(problems))
    if stop.is_set():
        log.warning(
            "interrupted: %d of %d orders settled; run again to resume", summary.done, summary.total
        )
        return EXIT_ORDERS
    if merger.gave_up:
        log.error(
            "the target stopped answering: %d orders left in pending/; run again once it is back",
            merger.gave_up,
        )
        return EXIT_UNREACHABLE
    return EXIT_OK if clean else EXIT_ORDERS


def _dry_run(job: Job) -> int:
    summary = Summary("dry-run", job.target)
    plan = Plan(job.root / CHECKPOINT_NAME, live=False)
    try:
        held: list[Found] = []
        stats = plan.build(admitted(scan(job.root, job.node), job.cluster, job.target, held))
        conflicts = plan.conflicts()
        summary.total = stats.files
        summary.extra.update(
            files=stats.files,
            corrupt=stats.corrupt - stats.unreadable,
            unreadable=stats.unreadable,
            dedupe_keys=stats.keys,
            duplicate_groups=stats.duplicate_groups,
            duplicates=stats.losers - conflicts,
            conflicts=conflicts,
            to_send=plan.to_send(),
            already_confirmed=plan.confirmed_before(),
        )
        summary.finish()
        doc = summary.as_dict()
        print(
            "edge-recover dry-run: "
            + ", ".join(
                f"{k.replace('_', ' ')} {doc[k]}"
                for k in (
                    "files",
                    "to_send",
                    "duplicate_groups",
                    "duplicates",
                    "conflicts",
                    "corrupt",
                    "unreadable",
                    "already_confirmed",
                )
            ),
            flush=True,
        )
        _print_problems(
            (_problem(p["problem"], p["file"], p["error"]) for p in plan.problems()),
            stats.corrupt,
        )
        for i, (key, serials, same) in enumerate(plan.duplicate_groups()):
            if i == 20:
                print(f"  ... ({stats.duplicate_groups - 20} more groups in the report)")
                break
            print(
                f"  {key}: {serials[0]} wins over {', '.join(serials[1:])}"
                f"{'' if same else ' (different bodies: conflict)'}"
            )
        _report_held(job, held, summary)
        doc = summary.as_dict()
        if job.report is not None:
            write_report(
                job.report,
                doc,
                "duplicate_groups",
                _groups(plan),
                {"problems": plan.problems()},
            )
    finally:
        plan.close()
    return EXIT_ORDERS if stats.corrupt or conflicts else EXIT_OK


# Outcomes that leave a file for ops to look at before the incident is closed.
TO_REVIEW = ("rejected", "conflict", UNREADABLE)


def _problem(outcome: str, file: str, error: str | None) -> str:
    """One line per file to review; the error's own copy of the file name is dropped."""
    text = error or ""
    for prefix in ("corrupt: ", ""):
        if text.startswith(f"{prefix}{file}: "):
            text = prefix + text[len(prefix) + len(file) + 2 :]
    return f"{outcome}: {file}: {text}"


def _print_problems(lines: Iterable[str], count: int, limit: int = 50) -> None:
    """Name the files that were no usable order (all of them are in --report)."""
    for i, line in enumerate(lines):
        if i == limit:
            print(f"  ... ({count - limit} more in the report)")
            break
        print(f"  {line}", flush=True)


def _report_held(
    job: Job, held: list[Found], summary: Summary, source_args: str | None = None
) -> None:
    """Orders pinned to another cluster: left in pending/, listed with the command."""
    if not held:
        return
    urls = dict(job.clusters)
    by_cluster: dict[str, list[str]] = {}
    for f in held:
        by_cluster.setdefault(f.pinned_to or "", []).append(f.serial or f.file)
    entries = {}
    for pin, serials in sorted(by_cluster.items()):
        url = normalize_url(pin)  # pinned by an earlier edge-recover to a URL
        where = url or urls.get(pin, f"<the {pin} cluster URL>")
        source = source_args or f"--path {job.root}"
        command = f"edge-recover {source} --mode merge --target {where}"
        entries[pin] = {"count": len(serials), "serials": serials, "command": command}
        print(
            f"edge-recover: {len(serials)} orders are pinned to "
            f"{url or 'the ' + pin + ' cluster'} (it may hold them already) and were not "
            f"sent to {job.target}; to deliver them: {command}",
            flush=True,
        )
    summary.extra["pinned_elsewhere"] = entries


def _groups(plan: Plan) -> Iterator[dict[str, object]]:
    for key, serials, same in plan.duplicate_groups():
        yield {
            "dedupe_key": key,
            "winner": serials[0],
            "duplicates": serials[1:],
            "same_body": same,
        }


async def _verify(job: Job, client: UpstreamClient) -> int:
    merged = BufferDirs(job.root).merged
    summary = Summary("verify", job.target, outcomes=VERIFY_OUTCOMES)
    summary.total = await asyncio.to_thread(count_merged, merged)
    progress = Progress(summary.total, "verify")
    stop = stop_event()
    verifier = Verifier(
        merged, client, job.target, job.concurrency, job.timeout_s, summary, progress, stop
    )
    try:
        await verifier.run()
        progress.close()
        summary.finish()
        print(f"edge-recover verify: {summary.line()}", flush=True)
        bad = sum(summary.counts[k] for k in VERIFY_OUTCOMES[1:])
        for i, entry in enumerate(verifier.problem_entries()):
            if i == 50:
                print(f"  ... ({bad - 50} more in the report)")
                break
            print(f"  {entry['status']}: {entry['file']} {entry.get('dedupe_key', '')}")
        if job.report is not None:
            write_report(job.report, summary.as_dict(), "problems", verifier.problem_entries())
    finally:
        verifier.problems.close()
    return EXIT_ORDERS if bad or stop.is_set() else EXIT_OK


def stop_event() -> asyncio.Event:
    """SIGINT/SIGTERM: send nothing more, let the requests already on the wire finish (their
    timeout bounds that), checkpoint, stop. A second signal ends the process at once.

    Ending at once is safe: a file leaves pending/ only after its checkpointed confirmation,
    pins are written before the next send, and the rerun asks the checkpoint and the
    center (same Idempotency-Key) before sending anything again.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first(signame: str) -> None:
        if not stop.is_set():
            log.warning(
                "%s: sending nothing more; waiting for the requests already sent, then "
                "stopping (again to abort at once)",
                signame,
            )
            stop.set()
            return
        sys.stderr.write(f"edge-recover: {signame} again: aborted at once; rerun to continue\n")
        sys.stderr.flush()
        os._exit(EXIT_ORDERS)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig.name)
    return stop


@contextlib.contextmanager
def _merge_lock(root: Path) -> Iterator[None]:
    """One merge per directory: a flock on DIR itself (no file is created for it)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another edge-recover merge is running on {root}") from None
        yield
    finally:
        os.close(fd)


def time_ms() -> int:
    return int(time.time() * 1000)
