"""Live reload: SIGHUP or a change of the file; invalid files refused; restart-only keys."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import orjson

from tests.support.fakes import FakeCenter
from tests.support.harness import order, wait_for, write_config


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)  # as config management does


async def test_file_change_applies_upstream_and_auth_live(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    other = await FakeCenter(host="127.0.0.3").start()
    try:
        path = write_config(tmp_path, center.url)
        proc = agent_process(path)
        proc.start()
        await proc.wait_ready(http)
        url = f"{proc.url}/v1/orders"
        hdrs = {"Content-Type": "application/json"}
        async with http.post(url, data=orjson.dumps(order(1)), headers=hdrs) as r:
            assert r.status == 201

        tokens = tmp_path / "tokens"
        tokens.write_text("t0ken\n")
        text = path.read_text().replace(center.url, other.url)
        text = text.replace('tokens_file = ""', f'tokens_file = "{tokens}"')
        _replace(path, text)

        attempt = 0

        async def moved() -> bool:
            nonlocal attempt
            attempt += 1
            async with http.post(
                url,
                data=orjson.dumps(order(f"2-{attempt}")),
                headers={**hdrs, "Authorization": "Bearer t0ken"},
            ) as r:
                return r.status == 201 and f"douyin:2-{attempt}" in other.creates

        await wait_for(moved, 10, "new primary and token in effect", interval=0.1)
        async with http.post(url, data=orjson.dumps(order(3)), headers=hdrs) as r:
            assert r.status == 401  # auth now required, without a restart
        assert "douyin:3" not in center.creates and "douyin:3" not in other.creates
    finally:
        await other.stop()


async def test_invalid_file_is_refused_and_sighup_reloads(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    path = write_config(tmp_path, center.url)
    good = path.read_text()
    proc = agent_process(path)
    proc.start()
    await proc.wait_ready(http)
    _replace(path, good.replace("[health]", "[health]\nbogus_key = 1"))
    await wait_for(lambda: "config reload refused" in proc.log.read_text(), 10, "refusal log")
    refusal = [line for line in proc.log.read_text().splitlines() if "reload refused" in line]
    assert refusal and all("health.bogus_key" in line for line in refusal)
    async with http.get(f"{proc.url}/status") as r:  # still running, old config
        assert (await r.json())["mode"] == "normal"

    # A restart-only key changes: logged; SIGHUP also triggers a reload.
    path.write_text(good.replace("shutdown_timeout_s = 5", "shutdown_timeout_s = 7"))
    proc.kill(signal.SIGHUP)
    await wait_for(
        lambda: "agent.shutdown_timeout_s" in proc.log.read_text(), 10, "restart-needed log"
    )
    async with http.get(f"{proc.url}/healthz") as r:
        assert r.status == 200
    assert proc.proc is not None and proc.proc.poll() is None


async def test_health_settings_reload_in_process(make_agent, center: FakeCenter, tmp_path):
    agent = await make_agent(center.url)
    path = tmp_path / "agent.toml"
    from agent.service.reload import ConfigReloader

    reloader = ConfigReloader(str(path), lambda: agent.service.cfg, agent.service.apply_config)
    path.write_text(path.read_text().replace("unhealthy_threshold = 2", "unhealthy_threshold = 4"))
    assert await reloader.reload_now() is True
    assert agent.service.cfg.health.unhealthy_threshold == 4
    assert agent.service.health.is_healthy("primary")
    status, _ = await agent.post(order(1))
    assert status == 201
