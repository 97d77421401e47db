"""A trial as a normal user (``sandbox --write-config``), and Ctrl-C, once or twice, in
every long-running command: no traceback, and no process left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
import pytest

from tests.support.fakes import FakeCenter
from tests.support.harness import AS_NOBODY, EDGE_AGENT, edge_agent, order, wait_for, write_config


def spawn(*args: str, prefix: tuple[str, ...] = (), **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, EDGE_AGENT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        **kw,
    )


async def reap(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=timeout)
    return proc.returncode, out, err


async def read_until(stream: IO[str], needle: str, timeout: float = 30) -> str:
    """Lines of ``stream`` up to the one holding ``needle``."""

    def read() -> str:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return "".join(seen)
        raise AssertionError(f"no {needle!r} in: {''.join(seen)}")

    return await asyncio.to_thread(read)


async def test_a_trial_as_a_normal_user(shared_dir: Path, agent_process: Any, http: Any):
    """The README's trial: sandbox --write-config DIR, check-config, run, one order; all as
    ``nobody``, nothing outside DIR."""
    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    trial = home / "trial"
    box = spawn("sandbox", "--write-config", str(trial), prefix=AS_NOBODY)
    try:
        out = await read_until(box.stdout, "run it:")  # type: ignore[arg-type]
        config = trial / "agent.toml"
        assert f"trial config: {config}" in out
        doc = tomllib.loads(config.read_text())
        assert doc["agent"]["state_dir"] == str(trial / "state")
        assert doc["buffer"]["path"] == str(trial / "spool")
        assert doc["agent"]["listen"].startswith("127.0.0.1:")
        checked = await asyncio.to_thread(
            edge_agent, "check-config", "--config", str(config), prefix=AS_NOBODY
        )
        assert checked.returncode == 0, checked.stderr
        agent = agent_process(config, prefix=AS_NOBODY)
        agent.start()
        await agent.wait_ready(http)
        async with http.post(f"{agent.url}/v1/orders", json=order(1)) as r:
            assert r.status == 201, await r.text()
            assert (await r.json())["status"] == "forwarded"
        agent.kill(signal.SIGTERM)
        assert await agent.reap() == 0
        assert (trial / "state").stat().st_uid == 65534  # written by nobody, under DIR
        # A second --write-config keeps the file: one line, exit 2, before anything starts.
        before = config.read_bytes()
        again = await asyncio.to_thread(
            edge_agent, "sandbox", "--write-config", str(trial), prefix=AS_NOBODY
        )
        assert again.returncode == 2
        assert again.stderr.strip().splitlines() == [
            f"edge-agent: {config} exists; pass --force to overwrite it (or choose another DIR)"
        ]
        assert config.read_bytes() == before
    finally:
        box.send_signal(signal.SIGINT)
        code, _, err = await reap(box)
    assert code == 0 and "Traceback" not in err, err


async def test_the_sandbox_alone_prints_a_complete_config():
    box = spawn("sandbox")
    try:
        out = await read_until(box.stdout, 'level = "info"')  # type: ignore[arg-type]
    finally:
        box.send_signal(signal.SIGINT)
        code, _, err = await reap(box)
    assert code == 0 and "Traceback" not in err, err
    text = out.split("agent config (save it as ", 1)[1].split("\n", 1)[1]
    doc = tomllib.loads("\n".join(line.removeprefix("  ") for line in text.splitlines()))
    assert doc["agent"]["state_dir"].endswith("edge-trial/state")
    assert doc["buffer"]["path"].endswith("edge-trial/spool")
    assert doc["upstream"]["nameservers"]


async def test_sandbox_a_second_ctrl_c_while_stopping_ends_it_at_once(
    http: aiohttp.ClientSession,
):
    """An order in flight at the (slow) primary holds the sandbox's stop up to a second:
    the second Ctrl-C comes while it stops."""
    box = spawn("sandbox")
    out = await read_until(box.stdout, "control")  # type: ignore[arg-type]
    center = out.split("primary  http://", 1)[1].split()[0].split("/")[0]  # name:port
    port = center.split(":")[1]
    control = out.split("control  POST ", 1)[1].split("/control/")[0]
    async with http.post(f"{control}/control/primary/slow") as r:
        assert r.status == 200
    posting = asyncio.create_task(
        http.post(
            f"http://127.0.0.2:{port}/v3/orders", data=b"{}", headers={"Idempotency-Key": "k"}
        )
    )
    await asyncio.sleep(0.5)  # the order reaches the center (which answers in 3 s)
    box.send_signal(signal.SIGINT)
    await read_until(box.stderr, "again to stop at once")  # type: ignore[arg-type]
    box.send_signal(signal.SIGINT)
    code, _, err = await reap(box)
    assert code == 130, err
    assert err.strip().splitlines() == [
        "edge-agent sandbox: second signal (SIGINT): stopped at once"
    ]
    with contextlib.suppress(aiohttp.ClientError):
        (await posting).close()


async def test_run_a_second_ctrl_c_while_stopping_ends_it_at_once(
    tmp_path: Path, center: FakeCenter, agent_process: Any, http: aiohttp.ClientSession
):
    """The first Ctrl-C waits for an order in flight (the center answers late); the
    second one does not."""
    config = write_config(tmp_path, center.url)
    proc = agent_process(config)
    proc.start()
    await proc.wait_ready(http)
    center.delay_s = 30
    posting = asyncio.create_task(http.post(f"{proc.url}/v1/orders", json=order(1)))
    await wait_for(lambda: center.received, 10, "the order on its way to the center")
    proc.kill(signal.SIGINT)
    await wait_for(lambda: "again to stop at once" in proc.log_tail(), 10, "the first stop")
    proc.kill(signal.SIGINT)
    assert await proc.reap() == 130
    log = proc.log_tail(50_000)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert log.strip().splitlines()[-1] == (
        "edge-agent: second signal (SIGINT): stopped at once; every acknowledged order is "
        "already on disk or at the center"
    )
    with contextlib.suppress(aiohttp.ClientError):
        (await posting).close()


async def test_ctrl_c_while_status_waits_is_one_line(tmp_path: Path):
    """``edge-agent status`` against an agent that accepts but never answers (wedged):
    Ctrl-C while it waits ended in a KeyboardInterrupt traceback."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = write_config(tmp_path, "http://127.0.0.1:1/v3", agent={"listen": f"127.0.0.1:{port}"})
    status = spawn("status", "--config", str(config))
    try:
        conn, _ = await asyncio.to_thread(listener.accept)  # it is waiting for an answer now
        status.send_signal(signal.SIGINT)
        code, _, err = await reap(status)
        conn.close()
    finally:
        listener.close()
    assert code == 130, err
    assert err.strip().splitlines() == ["edge-agent: interrupted"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts: PID 1 here may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def _drill_with_its_agent_up(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """``edge-agent drill`` in its own session (as a terminal's job), once its agent runs."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    drill = spawn("drill", "--scenario", "primary-outage", env=env, start_new_session=True)

    def agent_pid() -> int | None:
        logs = list(tmp_path.glob("edge-drill-*/primary-outage/agent.log"))
        if not logs or "agent accepting orders" not in logs[0].read_text(errors="replace"):
            return None
        pids = [p for p in _children(drill.pid) if "agent" in _cmdline(p)]
        return pids[0] if pids else None

    pid = await wait_for(agent_pid, 30, "the drill's agent to accept orders")
    return drill, pid


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_drill_ctrl_c_stops_its_agent_and_sandbox(tmp_path: Path):
    drill, agent = await _drill_with_its_agent_up(tmp_path)
    os.killpg(drill.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole job
    code, _, err = await reap(drill, 60)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == (
        "edge-agent drill: interrupted; its agent and sandbox are stopped"
    )
    assert _gone(agent)


async def test_drill_a_second_ctrl_c_aborts_at_once_and_its_agent_dies(tmp_path: Path):
    drill, agent = await _drill_with_its_agent_up(tmp_path)
    drill.send_signal(signal.SIGINT)  # to the drill alone: its agent hears nothing
    await read_until(drill.stderr, "again to abort at once")  # type: ignore[arg-type]
    drill.send_signal(signal.SIGINT)
    code, _, err = await reap(drill, 60)
    assert code == 130, err
    assert "Traceback" not in err, err
    assert (
        err.strip().splitlines()[-1] == "edge-agent drill: second signal (SIGINT): aborted at once"
    )
    await wait_for(lambda: _gone(agent), 10, "the drill's agent to die with the drill")


async def test_a_drill_agent_dies_with_its_drill(tmp_path: Path):
    """kill -9 of the drill (or a second Ctrl-C, which ends it at once) leaves no agent
    running on a sandbox that is gone."""
    drill, agent = await _drill_with_its_agent_up(tmp_path)
    drill.kill()
    await reap(drill)
    await wait_for(lambda: _gone(agent), 10, "the drill's agent to die with the drill")


async def test_check_config_beside_a_running_agent(
    tmp_path: Path, center: FakeCenter, agent_process: Any, http: aiohttp.ClientSession
):
    """check-config beside a running agent: it reads, never locks or writes."""
    config = write_config(tmp_path, center.url)
    proc = agent_process(config)
    proc.start()
    await proc.wait_ready(http)
    done = await asyncio.to_thread(edge_agent, "check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    async with http.get(f"{proc.url}/status") as r:
        assert orjson.loads(await r.read())["accepting"] is True
    proc.kill(signal.SIGTERM)
    assert await proc.reap() == 0


def test_the_trial_keeps_port_8470_after_an_agent_stopped_on_it() -> None:
    """A stopped trial agent leaves its connections in TIME_WAIT for a minute; the agent
    itself binds through that (SO_REUSEADDR), so the next trial config must not move to
    another port (the README's curl lines use 8470)."""
    from agent.drill.trial import DOCUMENTED_PORT, trial_port

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("127.0.0.1", DOCUMENTED_PORT))
    except OSError:
        server.close()
        pytest.skip(f"port {DOCUMENTED_PORT} is in use here")
    server.listen()
    client = socket.create_connection(("127.0.0.1", DOCUMENTED_PORT))
    conn, _ = server.accept()
    conn.close()  # the agent's side closes first: TIME_WAIT on 127.0.0.1:8470
    client.close()
    server.close()
    assert trial_port() == DOCUMENTED_PORT
