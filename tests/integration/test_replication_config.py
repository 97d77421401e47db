"""[replication] (CONTRACT 11) without a NATS cluster: parsed once, validated, and off by
default, in which case the agent contacts no NATS server at all."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent.config import ReplicationSection, parse_config
from agent.errors import ConfigError
from tests.support.fakes import FakeCenter, free_port
from tests.support.harness import AgentFactory, order


def test_replication_is_off_by_default() -> None:
    cfg = parse_config({"upstream": {"primary": "http://127.0.0.2/v3"}}, tokens=False)
    assert cfg.replication == ReplicationSection()
    assert cfg.replication.enabled is False


def test_replication_section_is_parsed() -> None:
    cfg = parse_config(
        {
            "upstream": {"primary": "http://127.0.0.2/v3"},
            "replication": {
                "enabled": True,
                "servers": ["nats://10.0.0.11:4222", "nats://10.0.0.12:4222"],
                "replicas": 3,
                "required": False,
                "timeout_s": 1.5,
            },
        },
        tokens=False,
    )
    r = cfg.replication
    assert (r.enabled, r.servers, r.replicas, r.required, r.timeout_s) == (
        True,
        ("nats://10.0.0.11:4222", "nats://10.0.0.12:4222"),
        3,
        False,
        1.5,
    )


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"enabled": True}, "replication.servers"),
        ({"servers": ["http://10.0.0.1:4222"]}, "replication.servers"),
        ({"replicas": 0}, "replication.replicas"),
        ({"replicas": 7}, "replication.replicas"),
        ({"timeout_s": 0}, "replication.timeout_s"),
        ({"enabled": "yes"}, "replication.enabled"),
        ({"quorum": 2}, "replication.quorum"),
        (
            {"enabled": True, "servers": ["nats://a:4222"], "credentials_file": "/nonexistent"},
            "replication.credentials_file",
        ),
    ],
)
def test_bad_replication_values_name_the_key(table: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_config(
            {"upstream": {"primary": "http://127.0.0.2/v3"}, "replication": table}, tokens=False
        )


async def test_disabled_replication_contacts_no_nats_server(
    make_agent: AgentFactory, center: FakeCenter, tmp_path: Path
) -> None:
    """servers point at a listening socket; with enabled = false nothing ever connects."""
    listener = socket.socket()
    listener.bind(("127.0.0.4", free_port("127.0.0.4")))
    listener.listen(8)
    listener.setblocking(False)
    host, port = listener.getsockname()
    try:
        await center.go_down()
        agent = await make_agent(
            center.url,
            replication={"enabled": False, "servers": [f"nats://{host}:{port}"]},
        )
        status, body = await agent.post(order(1))
        assert status == 202, body
        _, state = await agent.get("/status")
        assert state["replication"] is None
        _, found = await agent.get(f"/v1/orders/{body['serial']}")
        assert "replicated" not in found
        await asyncio.sleep(0.3)  # the one wait: proving that nothing arrives
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
