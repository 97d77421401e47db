"""Moving confirmed orders out of pending/ into merged/.

The agent's drain moves one file at a time by rename (no free space needed);
edge-recover moves many with one filesystem sync (``place_in_merged`` then
``complete_merged``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.base.durable import TMP_SUFFIX, fsync_dir, translate, unlink_quietly, write_tmp
from agent.base.syscalls import rename_noreplace, sync_filesystem
from agent.errors import OrderFileError
from agent.spool.claims import Claim
from agent.spool.reading import read_order_file
from agent.spool.record import ADDED_KEYS_MARK, BufferDirs, PendingRecord

log = logging.getLogger("agent.spool")


def merged_document(record: PendingRecord, order_id: Any, cluster: str, **extra: Any) -> bytes:
    """The audit copy kept in merged/: the record plus what the center said."""
    doc = record.to_dict()
    doc["order_id"] = order_id
    doc["cluster"] = cluster
    doc["merged_at"] = time.time()
    doc.update(extra)
    return orjson.dumps(doc)


def already_merged(
    dirs: BufferDirs, name: str, record: PendingRecord | None = None
) -> dict[str, Any] | None:
    """The merged/ copy of ``name`` if there is one, else None.

    A crash between the merged/ write and the pending unlink leaves both. With
    ``record``, the copy must also be that order (same serial and dedupe key),
    not an unrelated file that happens to share the name. A copy that cannot be
    read counts only without ``record`` (its name says it was delivered).
    """
    path = dirs.merged / name
    try:
        doc = orjson.loads(read_order_file(path))
    except FileNotFoundError:
        return None
    except (OSError, OrderFileError, orjson.JSONDecodeError):
        return None if record is not None else {"unreadable": True}
    if not isinstance(doc, dict):
        return None if record is not None else {"unreadable": True}
    if record is not None and (doc.get("serial"), doc.get("dedupe_key"), doc.get("body")) != (
        record.serial,
        record.dedupe_key,
        record.body,
    ):
        return None
    return doc


@dataclass
class MergedMove:
    """One confirmed order on its way from its source file to ``merged/{name}``.

    Exactly one way of moving applies:

    - ``added``: the source file itself is renamed into merged/ and these keys
      are added to its JSON object in place (no new inode: fast);
    - ``document``: a new merged/ copy is written and the source unlinked
      (for sources not in the record format);
    - neither: merged/{name} already holds this order; the source is unlinked.
    """

    claim: Claim
    name: str
    document: bytes | None = None
    added: dict[str, Any] | None = None


def place_in_merged(merged_dir: Path, moves: list[MergedMove]) -> list[BaseException | None]:
    """Many confirmed orders into merged/ with one filesystem sync (edge-recover).

    The order of steps keeps the promise that a source file never goes before
    its merged/ copy is durable:

    1. renamed sources (``added``): the keys are added by rewriting the file
       from its closing brace on (the order's bytes before it are never
       touched; ``strip_added_keys`` undoes a torn tail), then rename(2) into
       merged/ -- atomic, so the order is in exactly one of the two
       directories at every instant, even after a crash;
    2. new copies (``document``): temp file, rename into merged/;
    3. (``complete_merged``) one sync of the filesystem, then unlink the
       sources of 2 and of already merged ones, fsync their directories.

    Nothing is synced or unlinked here.

    No rename replaces a file in merged/: where the name is taken, by this very
    order (a crash left it) the source is dropped as in "neither", and by another
    order the move goes to the next free name beside it.
    """
    results: list[BaseException | None] = [None] * len(moves)
    into = os.fspath(merged_dir)
    for i, move in enumerate(moves):
        try:
            if move.added is not None:
                _add_keys(move.claim.where, move.claim, move.added)
                _into_merged(merged_dir, move, move.claim.where, move.claim.data)
            elif move.document is not None:
                tmp = Path(into, f".{move.name}{TMP_SUFFIX}")
                try:
                    write_tmp(tmp, move.document, sync=False)
                    renamed = _into_merged(merged_dir, move, tmp, move.document)
                except OSError:
                    unlink_quietly(tmp)
                    raise
                if not renamed:
                    unlink_quietly(tmp)
        except OSError as exc:
            results[i] = translate(exc, f"merged/{move.name}")
    return results


def _into_merged(merged_dir: Path, move: MergedMove, src: str | Path, data: bytes) -> bool:
    """Rename ``src`` to merged/{move.name}, or past it (see place_in_merged); False if
    merged/ already holds this order (``src`` stays)."""
    return took_name(move, rename_into(os.fspath(merged_dir), move.name, src, lambda: data))


def took_name(move: MergedMove, name: str | None) -> bool:
    """``rename_into``'s answer for ``move`` (the name it got, or None: merged/ already
    holds this order), applied to the move; False where the source stays."""
    if name is None:
        log.info("merged/%s already holds this order; its source is dropped", move.name)
        move.added = move.document = None  # now "neither": unlinked after the sync
        return False
    if name != move.name:
        log.warning("merged/%s holds another order: this one is kept as merged/%s", move.name, name)
    move.name = name
    return True


def rename_into(into: str, name: str, src: str | Path, data: Callable[[], bytes]) -> str | None:
    """Rename ``src`` to ``into``/``name``, never over a file there: where the name is
    taken by another order, to ``{stem}.1.json``, ``.2`` ...; the name it got, or None
    where the name holds this very order (``data()``: its content) and ``src`` stays."""
    stem, n = name.removesuffix(".json"), 0
    while True:
        taken = name if n == 0 else f"{stem}.{n}.json"
        try:
            rename_noreplace(src, f"{into}/{taken}")  # a str: this runs a million times
        except FileExistsError:
            if _same_order(Path(into, taken), data()):
                return None
            n += 1
            continue
        return taken


def _same_order(path: Path, data: bytes) -> bool:
    """Does ``path`` hold the order in ``data`` (same serial, dedupe key and body)?"""
    try:
        ours = orjson.loads(data)
        theirs = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    fields = ("serial", "dedupe_key", "body")
    return (
        isinstance(ours, dict)
        and isinstance(theirs, dict)
        and all(ours.get(f) is not None and ours.get(f) == theirs.get(f) for f in fields)
    )


def complete_merged(
    merged_dir: Path, moves: list[MergedMove], results: list[BaseException | None]
) -> list[BaseException | None]:
    """Steps 3 of place_in_merged's list: sync, then unlink; releases the claims."""
    try:
        unlink = [i for i, m in enumerate(moves) if m.added is None and results[i] is None]
        try:
            sync_filesystem(merged_dir)
        except OSError as exc:
            err = translate(exc, "the merged/ copies")
            for i in unlink:
                results[i] = err  # sources stay: nothing is unlinked unsynced
            return results
        parents = set()
        for i in unlink:
            path = moves[i].claim.path
            try:
                os.unlink(path)
                parents.add(path.parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                results[i] = translate(exc, str(path))
        for parent in parents:
            # A lost unlink only leaves a source that already_merged() recognises.
            with contextlib.suppress(OSError):
                fsync_dir(parent)
        return results
    finally:
        for move in moves:
            move.claim.release()


def _add_keys(path: str | Path, claim: Claim, added: dict[str, Any]) -> None:
    """Turn ``{...}`` into ``{...,"k":v}`` by rewriting from the closing brace on.

    ``claim.data`` is the file's content, a JSON object none of whose keys are
    in ``added``. The bytes before the closing brace are never touched.
    """
    tail = added_tail(claim.data, added)
    if tail is not None:
        write_tail(path, tail, len(claim.data), claim.fd if claim.writable else None)


def added_tail(data: bytes, added: dict[str, Any] | None) -> tuple[int, bytes] | None:
    """Where and what ``_add_keys`` writes into a file holding ``data``: (offset of the
    closing brace, the bytes from there on); None: nothing to add to, or a torn tail of
    an earlier attempt (leave the file as it is)."""
    end = data.rstrip().rfind(b"}")
    if end < 0 or not added or ADDED_KEYS_MARK in data:
        return None
    return end, b"," + orjson.dumps(added)[1:]


def write_tail(path: str | Path, tail: tuple[int, bytes], size: int, fd: int | None = None) -> None:
    """Write ``added_tail``'s bytes into the file of ``size`` bytes (``fd`` if held)."""
    end, data = tail
    held = fd
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC) if held is None else held
    try:
        os.pwrite(fd, data, end)
        if end + len(data) < size:
            os.ftruncate(fd, end + len(data))
    finally:
        if held is None:
            os.close(fd)


class MergedState(enum.Enum):
    NONE = "none"  # no merged/ copy of this name
    SAME = "same"  # merged/ holds this very order: the pending copy is left over
    OTHER = "other"  # merged/ holds a different order under this name


def merged_state(dirs: BufferDirs, name: str, record: PendingRecord | None) -> MergedState:
    """Compare the pending file with merged/{name}, if any (never discard on the name alone)."""
    if not (dirs.merged / name).exists():
        return MergedState.NONE
    if record is None:
        return MergedState.OTHER
    return MergedState.SAME if already_merged(dirs, name, record) else MergedState.OTHER


def move_to_merged(
    dirs: BufferDirs, claim: Claim, record: PendingRecord, order_id: Any, cluster: str
) -> None:
    """The center confirmed: annotate the file in place, then rename it into merged/.

    The rename needs no free space, so a full disk never stalls the drain. The
    center's answer (order_id, cluster, merged_at) is added first, in place and
    best effort: without room it is missing from the audit copy (the journal has
    it); a crash before the rename leaves a pending file that still parses (a
    torn tail is undone by ``strip_added_keys``) and is simply delivered again.
    """
    target = dirs.merged / claim.path.name
    state = merged_state(dirs, claim.path.name, record)
    try:
        if state is MergedState.SAME:  # left over from an earlier move: drop this copy
            os.unlink(claim.path)
            fsync_dir(claim.path.parent)
            return
        if state is MergedState.OTHER:
            raise FileExistsError(errno.EEXIST, "merged/ holds a different order", str(target))
    except OSError as exc:
        raise translate(exc, f"merged/{claim.path.name}") from exc
    try:
        _add_keys(
            claim.path, claim, {"order_id": order_id, "cluster": cluster, "merged_at": time.time()}
        )
    except OSError as exc:
        log.warning(
            "merged/%s keeps no order_id (%s); the journal has it",
            claim.path.name,
            exc.strerror or exc,
        )
    try:
        rename_noreplace(claim.path, target)  # taken since merged_state looked: stays
        fsync_dir(dirs.merged)
        fsync_dir(claim.path.parent)
    except OSError as exc:
        raise translate(exc, f"merged/{claim.path.name}") from exc
    with contextlib.suppress(OSError):
        os.utime(target)  # retention counts from the merge, not from the intake
