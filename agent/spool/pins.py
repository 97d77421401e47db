"""The one way an order file is pinned to a target (CONTRACT 5, DESIGN invariant 4).

The forward path writes a new file already pinned; everything that learns later
that a target may hold an order (the drain, edge-recover, start-up repair of a
send cut short) rewrites the claimed file here: durably, atomically, the claim
kept on the new inode so no other process can take the file in between.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.base.durable import replace_durably
from agent.spool.claims import Claim
from agent.spool.record import PendingRecord

log = logging.getLogger("agent.spool")


def pin_file(claim: Claim, record: PendingRecord, target: str, why: str) -> PendingRecord:
    """Rewrite the claimed file pinned to ``target``; the record now on disk.

    Blocking (fsyncs): call it in a thread. Raises PersistError, the file unchanged.
    """
    if record.pinned_to == target:
        return record
    pinned = record.pinned(target)
    data = pinned.to_bytes()
    # Through a symlink the pin goes to the order itself (the link's target, whose lock the
    # claim holds): replacing the link would leave the target, maybe another buffer's or
    # the agent's own file, free to go elsewhere.
    path = Path(os.path.realpath(claim.path)) if claim.linked else claim.path
    claim.replaced(replace_durably(path, data), data)
    log.warning(
        "order %s pinned to %s: %s",
        record.serial,
        target,
        why,
        extra={"serial": record.serial, "cluster": target},
    )
    return pinned
