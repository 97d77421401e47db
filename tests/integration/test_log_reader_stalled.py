"""A log reader that stops reading must not stop the agent from taking orders.

Under systemd the agent's stderr is a stream to journald, which stalls now and then
(busy, rate limiting, its disk full); in a shell it may be a pipe into ``less``. A
pipe holds 64 KiB: a process that writes its log lines on the event loop blocks there
once the reader stops, and every order waits with it. Here the agent's stderr is a
pipe nobody reads while offline orders (two log lines each with the ``log`` SMS
provider) come in; then the reader comes back and finds every line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import orjson

from agent.config import load_config
from agent.drill.agent_proc import AgentSubprocess
from tests.support.fakes import free_port
from tests.support.harness import ROOT, order, wait_for, write_config

ORDERS = 400  # ~2 lines of ~300 B each: 240 KB of log, four times what a pipe holds


async def _post(session: aiohttp.ClientSession, url: str, n: int) -> int:
    # A phone each: a phone gets at most sms.per_phone_per_hour notices.
    raw = orjson.dumps(order(f"stall-{n}", customer_phone=f"138{n:08d}"))
    async with session.post(
        f"{url}/v1/orders", data=raw, headers={"Content-Type": "application/json"}
    ) as r:
        await r.read()
        return r.status


def notices(lines: list[bytes]) -> set[str]:
    """The serials whose SMS notice the ``log`` provider wrote."""
    docs = [orjson.loads(line) for line in list(lines) if line.strip()]
    return {d["serial"] for d in docs if d["msg"].startswith("SMS (log provider)")}


async def test_orders_are_taken_while_nobody_reads_the_log(tmp_path: Path) -> None:
    primary = f"http://127.0.0.1:{free_port()}"  # nothing listens: orders are buffered
    config = write_config(tmp_path, primary)
    url = f"http://{load_config(str(config)).agent.listen}"
    agent = AgentSubprocess(config, tmp_path / "unused.log", url)
    # stderr a pipe nobody reads (AgentSubprocess.start would give it a file).
    agent.proc = proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    stderr = proc.stderr
    assert stderr is not None
    read: list[bytes] = []
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await agent.wait_ready(session)
            statuses = []
            for start in range(0, ORDERS, 20):
                statuses += await asyncio.gather(
                    *(_post(session, url, n) for n in range(start, start + 20))
                )
        assert statuses == [202] * ORDERS, "orders not buffered while the log was not read"
        # The reader comes back: every order's notice is logged, none dropped.
        reader = threading.Thread(target=lambda: read.extend(iter(stderr.readline, b"")))
        reader.start()
        await wait_for(lambda: len(notices(read)) == ORDERS, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    assert not [line for line in read if b"log lines dropped" in line]
    assert len(os.listdir(tmp_path / "spool" / "pending")) == ORDERS
