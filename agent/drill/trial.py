"""A trial config for a running sandbox: ``edge-agent sandbox --write-config DIR``.

Everything the agent writes stays under DIR (``state/``, ``spool/``), so a trial as any
user touches nothing in /var and leaves no test order where a later real install
would send it to a production center. The clusters are the sandbox's fake centers,
reached by name through its DNS, so they work only while that sandbox runs.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from agent.drill.agent_proc import Sections
from agent.drill.sandbox import Sandbox
from agent.errors import UsageError
from agent.sandbox.servers import free_port

DOCUMENTED_PORT = 8470  # the agent's usual port; a free one is taken when it is in use
TRIAL_NODE_ID = "trial-01"


def trial_port(host: str = "127.0.0.1") -> int:
    """8470 when it is free on ``host``, else any free port (the config and the output say)."""
    with socket.socket() as s:
        # As the agent binds (aiohttp sets SO_REUSEADDR): connections of a stopped agent
        # left in TIME_WAIT do not make the port look taken for a minute.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, DOCUMENTED_PORT))
        except OSError:
            return free_port(host)
    return DOCUMENTED_PORT


def trial_config(directory: Path, sandbox: Sandbox, port: int) -> Sections:
    """Operator defaults (health, SMS pacing) and the sandbox's centers, DNS and SMS."""
    return {
        "agent": {
            "node_id": TRIAL_NODE_ID,
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(directory / "state"),
        },
        "buffer": {"path": str(directory / "spool")},
        "upstream": {
            "primary": sandbox.primary_url,
            "standby": sandbox.standby_url,
            "nameservers": [sandbox.dns.nameserver],
        },
        "sms": {"provider": "http", "url": sandbox.sms.url},
        "auth": {"tokens_file": ""},  # no auth: the listener is loopback only
        "log": {"level": "info"},
    }


def header(sandbox: Sandbox) -> str:
    return (
        "# A trial config written by `edge-agent sandbox --write-config`: state and buffer\n"
        "# live under this directory; the clusters are that sandbox's fake centers (on\n"
        f"# port {sandbox.port}, DNS {sandbox.dns.nameserver}), which exist only while it runs.\n"
        "# Check it: edge-agent check-config --config <this file>\n"
    )


def refuse_existing(path: Path, force: bool) -> None:
    """Before the sandbox starts: an existing config is kept unless --force."""
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it (or choose another DIR)")


def write_trial_config(path: Path, text: str, force: bool) -> None:
    """Write ``path`` whole (temp file, rename); without ``force`` never over a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never replaced
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise UsageError(f"{path} exists; pass --force to overwrite it") from None
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
