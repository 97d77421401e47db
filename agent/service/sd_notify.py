"""systemd's sd_notify protocol: readiness, stopping and watchdog pings.

A notification is one datagram of ``KEY=VALUE`` lines sent to the unix socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket, i.e. a
leading NUL byte). Without ``$NOTIFY_SOCKET`` every method is a no-op, so the
agent behaves the same outside systemd.

The watchdog pings are sent by a task on the event loop, not by a thread: if
the loop is wedged (a blocking call, a busy loop) the pings stop and systemd
restarts the agent after ``WatchdogSec=``. That is the whole point of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from agent.base.tasks import cancel_and_wait

log = logging.getLogger("agent.sd_notify")


class SdNotifier:
    """Owns the notify socket and the watchdog task; ``start()`` / ``stop()`` it."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._error_logged = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def start(self) -> None:
        """Open the socket and, if systemd asked for a watchdog, start pinging."""
        if self.address is None or self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)  # a full receive queue drops a ping, never stalls the loop
        self._sock = sock
        if self.watchdog_interval_s is not None:
            self._task = asyncio.create_task(
                self._ping_forever(self.watchdog_interval_s), name="sd-notify-watchdog"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping: finishing in-flight orders") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def notify(self, *lines: str) -> bool:
        """Send one datagram; failures are logged once and otherwise ignored."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._error_logged:
                self._error_logged = True
                log.warning(
                    "cannot notify systemd at %s: %s (further errors not logged)",
                    _printable(self.address),
                    exc,
                )
            return False
        return True

    async def _ping_forever(self, interval_s: float) -> None:
        while True:
            self.watchdog()
            await asyncio.sleep(interval_s)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET %r: neither an absolute path nor @abstract", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC``, if it is meant for this process."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _printable(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
