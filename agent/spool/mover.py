"""edge-recover's side of the mover process (``agent.spool.mover_proc``).

The merge's claims, checkpoint writes and renames into merged/ are short system
calls, and in one process each of them hands the GIL over. Renaming a confirmed
order and adding its ``order_id`` took a third of the merge's one busy thread
(docs/performance.md); in a process of its own that work runs on the second core.

``place`` has ``place_in_merged``'s meaning, result for result: the same steps, in
the same order, with the same answers (a taken name, this very order already
there, an error). Should the process die, each file of the batch it had is found
where it left it, by the inode the merge's claim holds: still in pending/ (moved
then in-process) or in merged/ (the sync that follows makes it durable). The merge
moves the rest of its files itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.base.durable import translate
from agent.base.syscalls import CODE_ROOT, child_code, own_executable
from agent.errors import PersistError
from agent.spool.mover_proc import FAILED, MOVED, READY, SAME
from agent.spool.moves import MergedMove, added_tail, place_in_merged, took_name

log = logging.getLogger("agent.spool")
START_TIMEOUT_S = 30.0  # a new Python process imports the move functions first
STOP_TIMEOUT_S = 30.0
_CHILD = child_code("agent.spool.mover_proc")


class MoverProcess:
    """Owns the mover process. ``start()`` on the event loop's thread (the child dies
    with the thread that started it, ``dies_with_parent``); ``place()`` from one thread
    at a time; ``close()`` at the end."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _CHILD.format(root=CODE_ROOT), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                executable=own_executable(),
            )
        except OSError as exc:
            log.warning("no mover process (%s): the merge moves its files itself", exc)

    def close(self) -> None:
        """End of input: the child exits (``place`` waits for each answer, so no batch
        is left half done)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc, kill=False)

    def place(self, merged_dir: Path, moves: list[MergedMove]) -> list[BaseException | None]:
        """``place_in_merged(merged_dir, moves)``, the files renamed by the mover."""
        sent = [i for i, m in enumerate(moves) if m.added is not None]
        if self._proc is None or not sent:
            return place_in_merged(merged_dir, moves)
        results: list[BaseException | None] = [None] * len(moves)
        batch = [
            (
                os.fspath(m.claim.where),
                m.name,
                added_tail(m.claim.data, m.added),
                len(m.claim.data),
                m.claim.inode,
            )
            for m in (moves[i] for i in sent)
        ]
        try:
            answers = self._ask(os.fspath(merged_dir), batch)
        except PersistError as exc:
            log.error("%s; the merge moves its files itself from here on", exc)
            for i in sent:
                results[i] = _after_death(merged_dir, moves[i])
        else:
            for i, answer in zip(sent, answers, strict=True):
                results[i] = _settle(moves[i], answer)
        here = [i for i, m in enumerate(moves) if m.added is None]
        if here:
            done = place_in_merged(merged_dir, [moves[i] for i in here])
            for i, result in zip(here, done, strict=True):
                results[i] = result
        return results

    def _ask(self, into: str, batch: list[tuple[Any, ...]]) -> list[Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            if not self._ready:
                poll = select.poll()  # not select(): the merge holds thousands of claims
                poll.register(proc.stdout, select.POLLIN)
                first = proc.stdout.readline() if poll.poll(START_TIMEOUT_S * 1000) else b""
                if first != READY:
                    raise EOFError(f"it did not start (said {first!r})")
                self._ready = True
            pickle.dump((into, batch), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            answers: list[Any] = pickle.load(proc.stdout)
            if len(answers) != len(batch):
                raise EOFError(f"{len(answers)} answers to {len(batch)} moves")
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._proc = None
            code = _end(proc, kill=True)
            raise PersistError(f"the mover process ended (exit {code}, {exc})") from exc
        return answers


def _settle(move: MergedMove, answer: Any) -> BaseException | None:
    """One answer of the mover, applied to its move as ``place_in_merged`` would."""
    if answer[0] in (MOVED, SAME):
        took_name(move, answer[1] if answer[0] == MOVED else None)
        return None
    assert answer[0] == FAILED, answer
    _, err, strerror, filename = answer
    return translate(OSError(err, strerror, filename), f"merged/{move.name}")


def _after_death(merged_dir: Path, move: MergedMove) -> BaseException | None:
    """Where a mover that died left ``move``'s file, found by the inode the claim holds:
    still at its pending/ path (then moved here, as ``place_in_merged`` does: a tail the
    mover wrote is written again, the same bytes), or renamed into merged/ under its
    name or one beside it (``rename_into``: the first free of ``.1``, ``.2`` ...)."""
    held = move.claim.inode
    try:
        st = os.lstat(move.claim.where)
        here: tuple[int, int] | None = (st.st_ino, st.st_dev)
    except FileNotFoundError:
        here = None
    except OSError as exc:
        return translate(exc, f"merged/{move.name}")
    if held is None or here == held:
        return place_in_merged(merged_dir, [move])[0]
    stem, n = move.name.removesuffix(".json"), 0
    while True:
        name = move.name if n == 0 else f"{stem}.{n}.json"
        try:
            st = os.lstat(merged_dir / name)
        except OSError:
            return PersistError(
                f"{move.claim.where} is neither at its place in pending/ nor in merged/ "
                "after the mover process ended: look for it, then rerun the merge"
            )
        if (st.st_ino, st.st_dev) == held:
            took_name(move, name)
            return None
        n += 1


def _end(proc: subprocess.Popen[bytes], kill: bool) -> int:
    """Close our ends of the pipes and reap the child; its exit code."""
    if kill and proc.poll() is None:
        proc.kill()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
