"""The agent under drill: the real ``edge-agent run`` as a subprocess, real config file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import aiohttp

from agent.drill.sandbox import Sandbox
from agent.sandbox.servers import free_port


def drill_config(workdir: Path, sandbox: Sandbox, port: int, interval_s: float = 0.2,
                 unhealthy: int = 3, healthy: int = 2, health_timeout_s: float = 0.5) -> str:
    """A config like an operator's, with time compressed so a drill takes seconds."""
    return f"""\
[agent]
node_id = "drill-01"
listen = "127.0.0.1:{port}"
state_dir = "{workdir / 'state'}"
shutdown_timeout_s = 5

[buffer]
path = "{workdir / 'spool'}"
scan_interval_s = 2
drain_rate_per_s = 500

[upstream]
primary = "{sandbox.primary_url}"
standby = "{sandbox.standby_url}"
timeout_s = 2
nameservers = ["{sandbox.dns.nameserver}"]

[health]
interval_s = {interval_s}
timeout_s = {health_timeout_s}
unhealthy_threshold = {unhealthy}
healthy_threshold = {healthy}

[sms]
provider = "http"
url = "{sandbox.sms.url}"
per_phone_per_hour = 1000
retry_initial_s = 0.2
retry_max_s = 1

[auth]
tokens_file = ""
"""


class AgentUnderDrill:
    """Owns the agent subprocess and its working directory."""

    def __init__(self, workdir: Path, sandbox: Sandbox, **health: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "agent.toml"
        self.config.write_text(drill_config(workdir, sandbox, self.port, **health),
                               encoding="utf-8")
        self.log = workdir / "agent.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.spool = workdir / "spool"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    async def start(self, session: aiohttp.ClientSession, timeout: float = 20) -> None:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed in _reap()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self._log_fh)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"agent exited {self._proc.returncode}; see {self.log}")
            try:
                async with session.get(f"{self.url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"agent not ready within {timeout}s; see {self.log}")

    async def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            await self._reap()

    async def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        if self._proc is None:
            return 0
        self._proc.send_signal(signal.SIGTERM)
        return await self._reap()

    async def _reap(self, timeout: float = 20) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        code = self._proc.returncode
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return code

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.url}/status") as r:
            doc: dict[str, Any] = await r.json()
            return doc

    def pending(self) -> int:
        try:
            return sum(1 for n in os.listdir(self.spool / "pending") if n.endswith(".json")
                       and not n.startswith("."))
        except FileNotFoundError:
            return 0
