"""The claim process: pending/ listed, claimed, read and parsed on the second core.

The merge is CPU-bound on one core (the GIL) with the file steps, the HTTP
client and the bookkeeping all in one process. This child process (forked by
the merge: ``ps`` shows it with the merge's own command line) does the
first pass's file steps for pending/ -- list it once (``recovery.listing``),
then in name order open, flock and read each file and parse its record
(``recovery.decide.open_file``) -- and hands the results to the merge over a
UNIX socket, each claimed file's descriptor passed with it (``SCM_RIGHTS``).

The flock belongs to the open file description, not to a process: once the
descriptor is passed, the merge holds the claim exactly as if it had opened
the file itself, and the child closes its own copy. So nothing about claims,
moves or the checkpoint changes: the merge (its checkpoint) stays the one
writer of state, and this process never moves, writes or deletes a file.

Kill -9 of either side: the merge's end of the socket closes, the child's
next send fails and it exits; descriptors still in the socket are closed with
it, so no claim outlives both. A child that dies makes the merge stop as if
interrupted (``ClaimProcessDied``): nothing unconfirmed has moved, a rerun
resumes. The child writes no file anywhere (no temp files to leave behind).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.spool.claims import Claim
from agent.spool.record import BufferDirs, PendingRecord
from recovery.decide import Held, Opened, open_file
from recovery.finisher import Settled
from recovery.item import Item
from recovery.listing import SortedNames

# At most this many files per message: SCM_RIGHTS carries at most 253 descriptors.
CHUNK = 200
_HEAD = struct.Struct("!QI")  # payload length, descriptors attached

ClaimState = tuple[str, bytes, bool, bool]  # where, data, writable, linked
Packed = tuple[str, Any, ClaimState | None]
Received = Opened | Settled | Held


class ClaimProcessDied(RuntimeError):
    """The claim process ended before it sent every file (killed, or crashed)."""


class ClaimProcess:
    """The merge's end: start the child, take its count, then its chunks in name order."""

    def __init__(self, root: Path, node: str) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A fork, not a new interpreter: ready at once (the first order waits for it), and
        # the same code and interpreter whatever account and virtualenv run edge-recover.
        # Called from the event loop's thread before any claim is open.
        pid = os.fork()
        if pid == 0:  # the child: never returns
            parent.close()
            os._exit(_child(root, node, child))
        child.close()
        self._sock = parent
        self._pid = pid
        self.code: int | None = None
        self.failure: str | None = None  # why the child ended before sending every file

    def count(self) -> int:
        """Blocks until the child has listed pending/: the number of files in it."""
        try:
            doc, _ = _receive(self._sock)
            if not isinstance(doc, int):
                raise ClaimProcessDied(f"the claim process sent {doc!r} instead of its count")
        except ClaimProcessDied as exc:
            self.failure = str(exc)
            return 0
        return doc

    def chunks(self) -> Iterator[list[Received]]:
        """The claimed, read and parsed files of pending/, a chunk at a time, in name order;
        if the child dies, they end early and ``failure`` says why."""
        while self.failure is None:
            try:
                doc, fds = _receive(self._sock)
            except ClaimProcessDied as exc:
                self.failure = str(exc)
                return
            if doc is None:
                return
            yield _unpack(doc, fds)

    def close(self) -> None:
        """End the child (done, stopped or failed) and reap it: descriptors not taken are
        closed with the socket, so their claims go too."""
        self._sock.close()
        if self.code is None:
            _, status = os.waitpid(self._pid, 0)
            self.code = os.waitstatus_to_exitcode(status)


def _receive(sock: socket.socket) -> tuple[Any, list[int]]:
    try:
        head, fds, _, _ = socket.recv_fds(sock, _HEAD.size, 253, socket.MSG_WAITALL)
    except OSError as exc:
        raise ClaimProcessDied(f"the claim process is gone: {exc}") from exc
    if len(head) < _HEAD.size:
        for fd in fds:
            os.close(fd)
        raise ClaimProcessDied("the claim process ended before it sent every file")
    size, count = _HEAD.unpack(head)
    payload = bytearray(size)
    view, got = memoryview(payload), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            for fd in fds:
                os.close(fd)
            raise ClaimProcessDied("the claim process ended in the middle of a chunk")
        got += n
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise ClaimProcessDied(f"expected {count} descriptors, got {len(fds)}")
    return pickle.loads(payload), fds


def _send(sock: socket.socket, doc: Any, fds: list[int]) -> None:
    payload = pickle.dumps(doc, protocol=pickle.HIGHEST_PROTOCOL)
    socket.send_fds(sock, [_HEAD.pack(len(payload), len(fds))], fds)
    sock.sendall(payload)


def _pack(o: Received, fds: list[int]) -> Packed:
    claim = o.claim if isinstance(o, Opened | Settled) else None
    state: ClaimState | None = None
    if claim is not None and claim.fd is not None:
        fds.append(claim.fd)
        state = (str(claim.where), claim.data, claim.writable, claim.linked)
    if isinstance(o, Opened):
        # Plain strings, not the dataclasses: unpickling objects costs as much as parsing
        # the file again (~13 us per record here), strings and tuples a tenth of it.
        r = o.record
        fields = (r.serial, r.node_id, r.received_at, r.channel_id, r.dedupe_key)
        return ("o", (o.row.file, *fields, r.customer_phone, r.body, r.pinned_to), state)
    if isinstance(o, Settled):
        o.claim = None  # travels as ``state``; this process closes its copy after sending
        return ("s", o, state)
    return ("h", o.row, None)


def _unpack(doc: list[Packed], fds: list[int]) -> list[Received]:
    it = iter(fds)
    out: list[Received] = []
    for kind, payload, state in doc:
        claim = None
        if state is not None:
            where, data, writable, linked = state
            claim = Claim(where, next(it), data, writable)
            claim.linked = linked
        if kind == "o" and claim is not None:
            file, serial, node_id, received_at, channel, key, phone, body, pin = payload
            record = PendingRecord(serial, node_id, received_at, channel, key, phone, body, pin)
            out.append(Opened(Item(file, False, serial, key, pinned_to=pin), claim, record))
        elif kind == "s":
            payload.claim = claim
            out.append(payload)
        else:
            out.append(Held(payload))
    return out


def serve(root: Path, node: str, sock: socket.socket) -> None:
    """The child: list pending/, then claim, read and parse it in name order."""
    dirs = BufferDirs(root)
    names = SortedNames(root / "pending")
    _send(sock, len(names), [])
    chunk: list[Packed] = []
    fds: list[int] = []
    for name in names:
        chunk.append(_pack(open_file(root, dirs, node, Item(f"pending/{name}", False)), fds))
        if len(chunk) == CHUNK:
            _flush(sock, chunk, fds)
            chunk, fds = [], []
    _flush(sock, chunk, fds)
    _send(sock, None, [])


def _flush(sock: socket.socket, chunk: list[Packed], fds: list[int]) -> None:
    if not chunk:
        return
    try:
        _send(sock, chunk, fds)
    finally:
        for fd in fds:  # passed on (or the merge is gone): our copies go either way
            os.close(fd)


def _child(root: Path, node: str, sock: socket.socket) -> int:
    """The forked child's whole life; its exit code."""
    try:
        # Only the merge reacts to Ctrl-C and SIGTERM (it closes the socket, which ends
        # this process); nothing of the merge's own may be touched from here: its
        # descriptors (the checkpoint, the DIR lock, connections) are closed in this
        # process only, its wakeup pipe never written.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        serve(root, node, sock)
    except (BrokenPipeError, ConnectionResetError):
        return 1  # the merge is gone (stopped, or killed): nothing to hand over
    except BaseException:
        traceback.print_exc()
        return 2
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
    return 0
