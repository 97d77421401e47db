"""Starting the agent: expected failures are one line and a documented exit code, an
unknown cluster host is a warning, ``log.level`` applies and reloads.

The failures run the installed console script as a real non-root user (``nobody``),
as the issue met them: ``edge-agent run --config config/agent.toml`` as a normal user.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.drill.sandbox import PRIMARY_NAME, Sandbox
from tests.support.fakes import FakeCenter, free_port
from tests.support.harness import (
    AS_NOBODY,
    ROOT,
    AgentFactory,
    edge_agent,
    wait_for,
    write_config,
)


def run_as_nobody(config: Path) -> subprocess.CompletedProcess[str]:
    return edge_agent("run", "--config", str(config), prefix=AS_NOBODY)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def readable_config(shared_dir: Path, **sections: dict[str, Any]) -> Path:
    config = write_config(shared_dir, "http://127.0.0.1:1/v3", **sections)
    os.chmod(config, 0o644)
    return config


def test_the_example_config_as_a_normal_user_is_one_line(shared_dir: Path):
    """config/agent.toml points at /var/spool/edge-agent, which a normal user cannot create.
    (The directories are moved under a root-owned one, so the test does not depend on
    this machine's /var.)"""
    closed = shared_dir / "var"
    closed.mkdir(mode=0o755)
    text = (ROOT / "config" / "agent.toml").read_text()
    text = text.replace('"/var/', f'"{closed}/').replace('"/etc/edge-agent/tokens"', '""')
    config = shared_dir / "agent.toml"
    config.write_text(text)
    os.chmod(config, 0o644)
    done = run_as_nobody(config)
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith(f"edge-agent: cannot lock the buffer {closed}/spool/edge-agent: ")
    assert "Permission denied; check buffer.path: user nobody may not write there" in line
    assert "edge-agent sandbox --write-config DIR" in line


def test_an_unreadable_config_is_one_line(shared_dir: Path):
    config = readable_config(shared_dir)
    os.chmod(config, 0o600)  # root's, as /etc/edge-agent/agent.toml is
    done = run_as_nobody(config)
    assert done.returncode == 2
    assert one_line(done) == (
        f"edge-agent: config error: cannot read config file {config}: Permission denied; "
        "pass --config PATH"
    )


def test_an_unreadable_tokens_file_is_one_line_saying_what_to_do(shared_dir: Path):
    tokens = shared_dir / "tokens"
    tokens.write_text("t0ken\n")
    os.chmod(tokens, 0o600)  # root's, as /etc/edge-agent/tokens is
    done = run_as_nobody(readable_config(shared_dir, auth={"tokens_file": str(tokens)}))
    assert done.returncode == 2
    assert one_line(done) == (
        f"edge-agent: config error: cannot read tokens file {tokens}: Permission denied; "
        "make it readable by the agent's user, pass it with systemd "
        'LoadCredential=tokens:PATH, or set auth.tokens_file = "" (no auth: loopback only)'
    )


def test_a_state_dir_left_by_a_run_as_root_is_one_line(shared_dir: Path):
    """The service user owns the directory, but a run as root left its lock file."""
    state = shared_dir / "state"
    state.mkdir(mode=0o700)
    (state / ".agent.lock").write_text("")
    os.chmod(state / ".agent.lock", 0o600)
    os.chown(state, 65534, 65534)
    spool = shared_dir / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, 65534, 65534)
    done = run_as_nobody(readable_config(shared_dir))
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith(f"edge-agent: cannot lock the state dir {state}: Permission denied")
    assert "check agent.state_dir" in line


def test_a_buffer_subdirectory_taken_by_root_is_one_line(shared_dir: Path):
    for name in ("state", "spool"):
        (shared_dir / name).mkdir(mode=0o700)
        os.chown(shared_dir / name, 65534, 65534)
    (shared_dir / "spool" / "pending").mkdir(mode=0o700)  # root's
    done = run_as_nobody(readable_config(shared_dir))
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith(f"edge-agent: cannot set up the buffer {shared_dir}/spool/pending: ")
    assert "check buffer.path" in line


def test_a_port_in_use_is_one_line_exit_1(tmp_path: Path):
    """Exit 1: systemd restarts it (the holder may be on its way out)."""
    port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        config = write_config(
            tmp_path, "http://127.0.0.1:1/v3", agent={"listen": f"127.0.0.1:{port}"}
        )
        done = edge_agent("run", "--config", str(config))
    assert done.returncode == 1
    lines = [x for x in done.stderr.splitlines() if not x.startswith("{")]  # JSON log lines
    assert "Traceback" not in done.stderr and '"exc"' not in done.stderr, done.stderr
    assert lines == [
        f"edge-agent: cannot listen on agent.listen 127.0.0.1:{port}: Address already in use; "
        f"another process holds the port (ss -ltnp 'sport = :{port}' names it): stop it or "
        "set agent.listen to a free port"
    ]


async def test_an_unknown_cluster_host_is_a_warning_at_start(
    sandbox: Sandbox, make_agent: AgentFactory, caplog: pytest.LogCaptureFixture
):
    del sandbox.dns.records[PRIMARY_NAME]  # the sandbox's DNS answers NXDOMAIN for it
    caplog.set_level(logging.INFO)
    agent = await make_agent(
        sandbox.primary_url,
        upstream={"standby": sandbox.standby_url, "nameservers": [sandbox.dns.nameserver]},
    )
    assert agent.service.port  # it started all the same (DNS may come back)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "NXDOMAIN" in r.msg]
    assert len(warned) == 1
    assert warned[0].__dict__["cluster"] == "primary"
    assert warned[0].__dict__["host"] == PRIMARY_NAME
    assert not any(r.__dict__.get("cluster") == "standby" for r in warned)


async def test_log_level_applies_at_start_and_on_sighup(
    tmp_path: Path, center: FakeCenter, agent_process: Any, http: Any
):
    config = write_config(tmp_path, center.url, log={"level": "warning"})
    proc = agent_process(config)
    proc.start()
    await proc.wait_ready(http)
    config.write_text(config.read_text().replace('level = "warning"', 'level = "info"'))

    def reloaded() -> bool:
        if "config reloaded: log" in proc.log_tail(50_000):
            return True
        proc.kill(signal.SIGHUP)  # again: one sent before the reloader started is not heard
        return False

    await wait_for(reloaded, 10, "the reload's info line", interval=0.2)
    proc.kill(signal.SIGTERM)
    assert await proc.reap() == 0
    lines = proc.log_tail(50_000).splitlines()
    at = next(i for i, line in enumerate(lines) if "config reloaded: log" in line)
    before, after = "\n".join(lines[:at]), "\n".join(lines[at:])
    # At warning, start-up said nothing ("agent accepting orders" is info); at info, it
    # says "agent stopped".
    assert '"level":"info"' not in before and "agent accepting orders" not in before
    assert "agent stopped" in after
