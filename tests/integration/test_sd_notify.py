"""sd_notify: READY=1 / WATCHDOG=1 / STOPPING=1 to a real unix datagram socket."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent.service.sd_notify import SdNotifier
from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for, write_config


class NotifyListener:
    """What systemd does: a bound AF_UNIX datagram socket that collects messages."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        """Read every queued datagram; return the new ones."""
        new = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            new.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self.messages.extend(new)
        return new

    def total(self) -> int:
        self.drain()
        return len(self.messages)

    def count(self, key: str) -> int:
        self.drain()
        return sum(1 for m in self.messages if has(m, key))

    def close(self) -> None:
        self.sock.close()


def has(message: dict[str, str], item: str) -> bool:
    """``has(m, "READY=1")``: the datagram carried that KEY=VALUE line."""
    key, value = item.split("=", 1)
    return message.get(key) == value


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    lst = NotifyListener(str(path))
    yield lst
    lst.close()


def _env(notify_socket: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    return {**env, "NOTIFY_SOCKET": notify_socket, **extra}


async def test_agent_under_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path,
    center: FakeCenter,
    listener: NotifyListener,
    agent_process,
    http: aiohttp.ClientSession,
):
    proc = agent_process(
        write_config(tmp_path, center.url),
        env=_env(str(tmp_path / "notify.sock"), WATCHDOG_USEC="200000"),
    )
    proc.start()

    async def ready_seen() -> bool:
        assert proc.proc.poll() is None, (tmp_path / "agent.log").read_text()[-2000:]
        return any(has(m, "READY=1") for m in listener.drain())

    await wait_for(ready_seen, 20, "READY=1", interval=0.01)
    # READY=1 means "accepts orders": the listener must answer right away.
    for path in ("/healthz", "/readyz"):
        async with http.get(f"{proc.url}{path}") as r:
            assert r.status == 200, path
    ready = next(m for m in listener.messages if has(m, "READY=1"))
    assert ready["STATUS"].startswith("accepting orders on 127.0.0.1:")
    assert not any(has(m, "STOPPING=1") for m in listener.messages)

    pings = listener.count("WATCHDOG=1")
    await wait_for(lambda: listener.count("WATCHDOG=1") >= pings + 3, 10, "watchdog pings")

    proc.kill(signal.SIGTERM)
    await wait_for(lambda: listener.count("STOPPING=1") == 1, 10, "STOPPING=1")
    assert await proc.reap() == 0
    listener.drain()
    kinds = [next(iter(m)) for m in listener.messages if not has(m, "WATCHDOG=1")]
    assert kinds == ["READY", "STOPPING"], listener.messages


async def test_agent_without_notify_socket_runs_normally(
    tmp_path: Path, center: FakeCenter, agent_process, http: aiohttp.ClientSession
):
    env = _env("")
    del env["NOTIFY_SOCKET"]
    proc = agent_process(write_config(tmp_path, center.url), env=env)
    proc.start()
    await proc.wait_ready(http)
    proc.kill(signal.SIGTERM)
    assert await proc.reap() == 0


async def test_watchdog_stops_while_the_event_loop_is_blocked(
    tmp_path: Path, listener: NotifyListener
):
    notifier = SdNotifier(_env(str(tmp_path / "notify.sock"), WATCHDOG_USEC="100000"))
    assert notifier.watchdog_interval_s == pytest.approx(0.05)
    await notifier.start()
    try:
        await wait_for(lambda: listener.count("WATCHDOG=1") >= 2, 5, "first pings")

        async def wedged() -> None:
            # Deliberately block the event loop (a synchronous sleep inside a
            # coroutine) for ten watchdog intervals: a wedged agent.
            time.sleep(0.5)

        listener.drain()
        before = len(listener.messages)
        await wedged()
        # Read what arrived during the block before the loop can run again.
        during = listener.drain()
        assert during == [], f"pings arrived while the loop was blocked: {during}"
        assert len(listener.messages) == before
        await wait_for(lambda: listener.count("WATCHDOG=1") >= 2, 5, "pings resume")
    finally:
        await notifier.stop()
    listener.drain()
    after_stop = len(listener.messages)
    await asyncio.sleep(0.3)  # deliberately idle for 6 intervals: nothing may arrive now
    assert listener.drain() == []
    assert len(listener.messages) == after_stop


async def test_abstract_socket():
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    lst = NotifyListener(b"\0" + name.encode())
    notifier = SdNotifier({"NOTIFY_SOCKET": f"@{name}"})
    try:
        await notifier.start()
        notifier.ready("accepting orders")
        notifier.stopping()
        await wait_for(lambda: lst.total() >= 2, 5, "both datagrams")
        assert lst.messages == [
            {"READY": "1", "STATUS": "accepting orders"},
            {"STOPPING": "1", "STATUS": "stopping: finishing in-flight orders"},
        ]
    finally:
        await notifier.stop()
        lst.close()


async def test_no_notify_socket_is_a_noop():
    notifier = SdNotifier({"WATCHDOG_USEC": "100000"})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    await notifier.start()
    notifier.ready("x")
    notifier.stopping()
    assert notifier.notify("WATCHDOG=1") is False
    await notifier.stop()


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_PID": "1"},  # the watchdog is meant for another process
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {},
    ],
)
async def test_no_watchdog_unless_meant_for_us(
    tmp_path: Path, listener: NotifyListener, extra: dict[str, str]
):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000", **extra}
    if not extra:
        del env["WATCHDOG_USEC"]
    notifier = SdNotifier(env)
    assert notifier.watchdog_interval_s is None
    await notifier.start()
    try:
        notifier.ready("up")  # the socket itself still works
        await wait_for(lambda: listener.count("READY=1") == 1, 5, "READY=1")
    finally:
        await notifier.stop()
    assert listener.count("WATCHDOG=1") == 0


async def test_watchdog_pid_equal_to_ours_is_honoured(tmp_path: Path, listener: NotifyListener):
    notifier = SdNotifier(
        {
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    await notifier.start()
    try:
        await wait_for(lambda: listener.count("WATCHDOG=1") >= 2, 5, "pings")
    finally:
        await notifier.stop()


async def test_send_errors_are_logged_once_and_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    notifier = SdNotifier(
        {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "20000"}
    )
    caplog.set_level(logging.WARNING, logger="agent.sd_notify")
    await notifier.start()
    try:
        notifier.ready("up")
        assert notifier.notify("STATUS=x") is False
        notifier.stopping()
        await wait_for(lambda: len(caplog.records) >= 1, 5, "the warning")
        task = notifier._task
        assert task is not None and not task.done(), "the watchdog task must survive errors"
    finally:
        await notifier.stop()
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(f"cannot notify systemd at {tmp_path / 'nobody-listens.sock'}: ")
    )


def test_relative_notify_socket_is_ignored():
    assert not SdNotifier({"NOTIFY_SOCKET": "relative/path"}).enabled
