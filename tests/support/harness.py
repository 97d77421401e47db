"""What every test shares: the agent in-process or as a subprocess, configs, polling.

The fixtures that build on these live in ``tests/conftest.py``; the fakes of the
center, SMS gateways and downstream systems in ``tests/support/fakes.py`` and
``tests/support/chain_fakes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.config import Config, load_config
from agent.drill.agent_proc import AgentSubprocess, write_config_file
from agent.service.service import Service
from tests.support.fakes import FakeSmsGateway, free_port

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, primary: str, **sections: dict[str, Any]) -> Path:
    """A config file for a test agent in ``tmp``; ``sections`` override keys."""
    base: dict[str, dict[str, Any]] = {
        "agent": {
            "node_id": "wh-test-01",
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(tmp / "state"),
            "shutdown_timeout_s": 5,
        },
        "buffer": {"path": str(tmp / "spool"), "scan_interval_s": 1, "drain_rate_per_s": 1000},
        "upstream": {"primary": primary, "timeout_s": 2},
        "health": {
            "interval_s": 0.1,
            "timeout_s": 0.5,
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
        },
        "sms": {"provider": "log"},
        "auth": {"tokens_file": ""},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_config_file(tmp / "agent.toml", base)


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class AgentHandle:
    """An in-process agent (real server, real files) with helpers to talk to it."""

    def __init__(self, cfg: Config, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.service = Service(cfg)
        self.session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"

    @property
    def spool(self) -> Path:
        return Path(self.cfg.buffer.path)

    async def post(
        self,
        body: bytes | dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.post(f"{self.url}/v1/orders", data=raw, headers=hdrs) as r:
            return r.status, orjson.loads(await r.read())

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(f"{self.url}{path}") as r:
            data = await r.read()
            try:
                return r.status, orjson.loads(data)
            except orjson.JSONDecodeError:
                return r.status, data.decode()

    def files(self, sub: str) -> list[str]:
        """The visible files of ``sub`` (a temp file mid-rewrite is not an order)."""
        return sorted(n for n in os.listdir(self.spool / sub) if not n.startswith("."))


AgentFactory = Callable[..., Awaitable[AgentHandle]]


def order(n: int | str, **extra: Any) -> dict[str, Any]:
    return {"channel_id": "douyin", "channel_order_id": str(n), "amount": "199.10", **extra}


class AgentProcess(AgentSubprocess):
    """``edge-agent run`` as a real subprocess, for crash and signal tests."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        cfg = load_config(str(config))
        super().__init__(
            config, log, f"http://{cfg.agent.listen}", env=env, cwd=ROOT, prefix=prefix
        )


# As an operator's own account: root reads any file whatever its mode, nobody does not.
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--")


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "64k") -> Iterator[Path]:
    """A small tmpfs mounted at ``mount`` for the block (root only; else the test skips)."""
    mount.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def as_sudo_cp_leaves_it(path: Path) -> None:
    """Owned by root, mode 0600: what ``sudo cp`` leaves behind."""
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)


def sms_http(gateway: FakeSmsGateway, **extra: Any) -> dict[str, Any]:
    """``[sms]`` keys for the http provider against ``gateway``, with fast retries."""
    return {
        "provider": "http",
        "url": gateway.url,
        "retry_initial_s": 0.1,
        "retry_max_s": 0.3,
        "timeout_s": 2,
        **extra,
    }


EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))  # the installed console script


def edge_agent(
    *args: str, prefix: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``edge-agent ARGS`` as an operator types it; ``prefix=AS_NOBODY``: as a normal user."""
    return subprocess.run(
        [*prefix, EDGE_AGENT, *args], capture_output=True, text=True, cwd="/", timeout=timeout
    )


def into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``edge-agent ARGS | head -0``: the reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [EDGE_AGENT, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        os.close(write_end)
