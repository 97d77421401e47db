"""Configuration errors exit 2 naming the key; the status command's exit codes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import __version__
from agent.cli import status_lines
from agent.config import load_config
from tests.support.fakes import FakeCenter, free_port
from tests.support.harness import ROOT, into_a_closed_pipe, write_config


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env=env,
    )


def test_example_config_is_valid():
    cfg = load_config(str(ROOT / "config" / "agent.toml"))
    assert cfg.agent.node_id == "wh-sh-01"
    assert cfg.buffer.scan_interval_s == 30 and cfg.buffer.drain_rate_per_s == 200
    assert cfg.upstream.primary.startswith("https://")


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[upstream]\nprimary = "http://127.0.0.1:1"\nprimry = "x"\n', "upstream.primry"),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[agent]\nmax_body_bytes = "1MB"\n',
            "agent.max_body_bytes",
        ),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[health]\ninterval_s = true\n',
            "health.interval_s",
        ),
        ('[agent]\nnode_id = "wh-1"\n', "upstream.primary"),
        ('[upstream]\nprimary = "ftp://x"\n', "upstream.primary"),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[agent]\nnode_id = "../x"\n',
            "agent.node_id",
        ),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[sms]\ntemplate = "no serial"\n',
            "sms.template",
        ),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[sms]\ntemplate = "{SN} {phone}"\n',
            "sms.template",
        ),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[agent]\nlisten = "0.0.0.0:8470"\n'
            '[auth]\ntokens_file = ""\n',
            "agent.listen",
        ),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[agent]\nhead_timeout_s = 0\n',
            "agent.head_timeout_s",
        ),
        (
            '[upstream]\nprimary = "http://127.0.0.1:1"\n[agent]\nkeepalive_timeout_s = -1\n',
            "agent.keepalive_timeout_s",
        ),
        ('[upstream]\nprimary = "http://127.0.0.1:1"\n[extra]\n', "[extra]"),
        ("[upstream\n", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, toml: str, named: str):
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    done = _run("run", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, not a traceback


def test_missing_config_file_exits_2_naming_the_file(tmp_path: Path):
    done = _run("run", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2 and "nope.toml" in done.stderr


def test_config_path_from_environment(tmp_path: Path):
    path = tmp_path / "env.toml"
    path.write_text('[upstream]\nprimary = "http://127.0.0.1:1"\nbogus = 1\n')
    done = _run("status", env={"EDGE_AGENT_CONFIG": str(path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "upstream.bogus" in done.stderr and "env.toml" in done.stderr


@pytest.mark.parametrize(
    "args", [("frobnicate",), ("drill", "--orders", "abc"), ("drill", "--scenario", "no-such")]
)
def test_usage_error_exits_2_with_one_line(args):
    done = _run(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_recover_usage_error_exits_2():
    done = subprocess.run(
        [sys.executable, "-m", "recovery", "--path", "x", "--mode", "merge"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 2 and "not a directory" in done.stderr


def test_status_exit_codes(tmp_path: Path):
    path = write_config(tmp_path, "http://127.0.0.1:1/v3")
    done = _run("status", "--config", str(path))
    assert done.returncode == 3 and "not reachable" in done.stderr


async def test_status_against_a_running_agent(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    """edge-agent status runs in a thread: a blocking run would stall the fake center's
    health answers on this loop, and the agent would rightly call it down."""
    from tests.support.harness import wait_for

    async def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_run, "status", "--config", str(path), *extra)

    path = write_config(tmp_path, center.url)
    proc = agent_process(path)
    proc.start()
    await proc.wait_ready(http)
    # Ready means "accepts orders"; the primary counts as healthy after its first checks.
    done = await wait_for(lambda: _ok(status("--json")), 15, "status to report normal")
    doc = orjson.loads(done.stdout)
    assert doc["mode"] == "normal" and doc["clusters"]["primary"]["healthy"] is True
    assert doc["pending"] == 0
    await center.go_down()
    done = await wait_for(lambda: _exits(status(), 1), 15, "status to report offline")
    assert f"mode: offline (edge-agent {__version__})" in done.stdout
    assert "rejected: 0" in done.stdout.splitlines()
    assert "replica:" not in done.stdout  # no [replication]: no replica line


async def _ok(run: Any) -> subprocess.CompletedProcess[str] | None:
    return await _exits(run, 0)


async def _exits(run: Any, code: int) -> subprocess.CompletedProcess[str] | None:
    done: subprocess.CompletedProcess[str] = await run
    return done if done.returncode == code else None


def test_port_helper_gives_a_free_port():
    assert 0 < free_port() < 65536


async def test_status_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    path = write_config(tmp_path, center.url)
    proc = agent_process(path)
    proc.start()
    await proc.wait_ready(http)
    done = await asyncio.to_thread(into_a_closed_pipe, "status", "--config", str(path))
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141  # as a shell reports a process that SIGPIPE ended


def test_status_text_names_what_needs_a_look() -> None:
    """The text form carries what an operator acts on: files to review, the replica's lag."""
    doc = {
        "mode": "offline",
        "version": "9.9.9",
        "clusters": {"primary": {"healthy": False, "last_error": "connection refused"}},
        "pending": 12,
        "oldest_pending_age_s": 61.2,
        "sms_outbox": 3,
        "rejected": 2,
        "replication": {
            "healthy": False,
            "last_error": "no quorum",
            "unreplicated": 5,
            "owed_changes": 1,
            "reconciled": False,
        },
    }
    assert status_lines(doc) == [
        "mode: offline (edge-agent 9.9.9)",
        "primary: DOWN (connection refused)",
        "pending: 12 (oldest 61s)",
        "sms outbox: 3",
        "rejected: 2 file(s) to review in rejected/",
        "replica: DOWN (no quorum), 5 order(s) not replicated, 1 change(s) owed; "
        "pending/ held until reconciled",
    ]
