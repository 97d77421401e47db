"""The agent as a real subprocess with a real config file: for drills, tests and benches.

One harness for all three: ``write_config_file`` writes TOML with every string
escaped (a path with a quote or a backslash is still that path), and
``AgentSubprocess`` starts ``python -m agent run``, waits for ``/readyz``,
kills it with real signals and reaps it without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

from agent.base.syscalls import dies_with_parent
from agent.drill.sandbox import Sandbox
from agent.sandbox.servers import free_port

Sections = dict[str, dict[str, Any]]


def toml_value(value: Any) -> str:
    """A TOML value: strings as basic strings (JSON escapes are valid TOML escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. equal = { "/amount" = "..." }
        return (
            "{ "
            + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items())
            + " }"
        )
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"no TOML form for {type(value).__name__}: {value!r}")


def write_config_file(path: Path, sections: Sections) -> Path:
    path.write_text(config_text(sections), encoding="utf-8")
    return path


def config_text(sections: Sections) -> str:
    """TOML; a list of tables under a key (``chain.step``) is written as ``[[name.key]]``."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        tables = {
            k: v
            for k, v in values.items()
            if isinstance(v, list) and v and all(isinstance(t, dict) for t in v)
        }
        lines += [
            f"{key} = {toml_value(value)}" for key, value in values.items() if key not in tables
        ]
        lines.append("")
        for key, entries in tables.items():
            for entry in entries:
                lines.append(f"[[{name}.{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
                lines.append("")
    return "\n".join(lines)


def drill_config(
    workdir: Path,
    sandbox: Sandbox,
    port: int,
    interval_s: float = 0.2,
    unhealthy: int = 3,
    healthy: int = 2,
    health_timeout_s: float = 0.5,
) -> Sections:
    """A config like an operator's, with time compressed so a drill takes seconds."""
    return {
        "agent": {
            "node_id": "drill-01",
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(workdir / "state"),
            "shutdown_timeout_s": 5,
        },
        "buffer": {"path": str(workdir / "spool"), "scan_interval_s": 2, "drain_rate_per_s": 500},
        "upstream": {
            "primary": sandbox.primary_url,
            "standby": sandbox.standby_url,
            "timeout_s": 2,
            "nameservers": [sandbox.dns.nameserver],
        },
        "health": {
            "interval_s": interval_s,
            "timeout_s": health_timeout_s,
            "unhealthy_threshold": unhealthy,
            "healthy_threshold": healthy,
        },
        "sms": {
            "provider": "http",
            "url": sandbox.sms.url,
            "per_phone_per_hour": 1000,
            "retry_initial_s": 0.2,
            "retry_max_s": 1,
        },
        "auth": {"tokens_file": ""},
        "chain": sandbox.chain_section(),
    }


class AgentSubprocess:
    """Owns one ``edge-agent run`` subprocess, its config path and its log file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        url: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.prefix = prefix  # e.g. setpriv ... --: run it as another user
        self.log = log
        self.url = url
        self.env = env  # None: inherit os.environ
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        # Run in the child before exec (e.g. lower RLIMIT_NOFILE for a test).
        self.preexec_fn: Callable[[], None] | None = None

    def start(self) -> None:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self._log_fh,
            env=self.env,
            cwd=self.cwd,
            preexec_fn=self.preexec_fn,
        )

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"agent exited {code}: {self.log_tail()}")
            try:
                async with session.get(f"{self.url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not ready within {timeout}s: {self.log_tail()}")
            await asyncio.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def reap(self, timeout: float = 20) -> int:
        """Wait for the exit without blocking the loop (the fakes live in it); SIGKILL
        after ``timeout``."""
        if self.proc is None:
            return 0
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.kill()
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        self._close_log()
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        """Last resort at teardown: never leave a process behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"


class AgentUnderDrill(AgentSubprocess):
    """The drill's agent: a working directory with its config, state and spool."""

    def __init__(
        self, workdir: Path, sandbox: Sandbox, extra: Sections | None = None, **health: Any
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        sections = drill_config(workdir, sandbox, self.port, **health) | (extra or {})
        config = write_config_file(workdir / "agent.toml", sections)
        super().__init__(config, workdir / "agent.log", f"http://127.0.0.1:{self.port}")
        self.spool = workdir / "spool"
        self.state_dir = workdir / "state"
        self.preexec_fn = dies_with_parent()

    async def start_ready(self, session: aiohttp.ClientSession, timeout: float = 20) -> None:
        self.start()
        await self.wait_ready(session, timeout)

    async def kill9(self) -> None:
        """kill -9: no chance to flush anything."""
        self.kill(signal.SIGKILL)
        await self.reap()

    async def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        if self.proc is None or self.proc.poll() is not None:
            return 0 if self.proc is None else int(self.proc.returncode)
        self.kill(signal.SIGTERM)
        return await self.reap()

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.url}/status") as r:
            doc: dict[str, Any] = await r.json()
            return doc

    def pending(self) -> int:
        try:
            return sum(
                1
                for n in os.listdir(self.spool / "pending")
                if n.endswith(".json") and not n.startswith(".")
            )
        except FileNotFoundError:
            return 0
