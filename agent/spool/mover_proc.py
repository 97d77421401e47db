"""edge-recover's mover process: confirmed orders renamed into merged/, off the merge's GIL.

Run by edge-recover (``agent.spool.mover``) with the argument PARENT_PID. It dies with
its parent (PR_SET_PDEATHSIG), so a kill -9 of the merge also ends it and a rerun never
meets a mover still renaming files whose claims died with the merge. It ignores SIGINT
and SIGTERM (a terminal and systemd signal the whole group): the merge decides when it
ends, by closing its stdin.

Its first line on stdout is ``ready``. Then, on stdin, one pickled batch at a time,
``(merged_dir, [(src, name, tail, size, inode), ...])``, and for each batch one pickled list
of answers on stdout, in the batch's order:

* ``(MOVED, name)``: ``tail`` (None, or ``agent.spool.moves.added_tail``'s offset and
  bytes) written into ``src``, if it is still the file of ``inode`` (the claim's
  (st_ino, st_dev)), then ``src`` renamed to merged/{name} (the name it got: another
  order's file there is never replaced, ``agent.spool.moves.rename_into``);
* ``(SAME, name)``: merged/{name} already holds this very order; ``src`` stays;
* ``(FAILED, errno, strerror, filename)``: a step failed; nothing after it was done.

The merge sends a batch only after its checkpoint holds the batch's outcomes, and
syncs the filesystem after the answers, before it unlinks anything
(``agent.spool.moves``): the steps and their order are those of ``place_in_merged``,
only in another process. The pipes join two processes of our own code, so pickle
(the standard library's framing for Python values) is safe here.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
from typing import Any, BinaryIO

from agent.base.syscalls import child_armed
from agent.spool.moves import rename_into, write_tail

MOVED, SAME, FAILED = "moved", "same", "failed"
READY = b"ready\n"  # the first line: it runs and will die with its parent


def move_one(
    into: str,
    src: str,
    name: str,
    tail: tuple[int, bytes] | None,
    size: int,
    inode: tuple[int, int] | None,
) -> Any:
    try:
        if tail is not None:
            # By path, so first make sure it is still the file the merge claimed: the
            # tail's offset is that file's, and in another it would cut an order short.
            # Never blocks: a FIFO put there since the claim fails the open (ENXIO).
            fd = os.open(src, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if inode is not None and (st.st_ino, st.st_dev) != inode:
                    return (FAILED, errno.ESTALE, "replaced since the merge claimed it", src)
                write_tail(src, tail, size, fd)
            finally:
                os.close(fd)

        def content() -> bytes:
            with open(src, "rb") as f:
                return f.read()

        taken = rename_into(into, name, src, content)
    except OSError as exc:
        return (FAILED, exc.errno, exc.strerror, exc.filename)
    return (SAME, name) if taken is None else (MOVED, taken)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    while True:
        try:
            into, moves = pickle.load(inp)
        except EOFError:
            return  # the merge closed its end: done
        answers = [move_one(into, *move) for move in moves]
        pickle.dump(answers, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m agent.spool.mover_proc PARENT_PID", file=sys.stderr)
        return 2
    if not child_armed(int(argv[1]), READY):
        return 1
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
