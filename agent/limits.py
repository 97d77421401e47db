"""Process-wide limits, set once at start by the agent and by edge-recover."""

from __future__ import annotations

import contextlib
import resource


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    The agent holds a descriptor per client connection, edge-recover one per order
    in flight (its claim): allow as many as the administrator permits. systemd's
    default soft limit is 1024; its hard limit (LimitNOFILE=) is far higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
