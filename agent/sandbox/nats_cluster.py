"""A real nats-server cluster on loopback, for the tests, the drill and the bench.

Each node runs JetStream in its own store directory with distinct client and
cluster ports; ``kill`` sends a real signal, ``start`` brings a node back on
the same ports and store. ``wait_ready`` polls until JetStream has a meta leader.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.errors import Error as NatsError
from nats.js.api import StorageType, StreamConfig

from agent.replica.stream import Change, states
from agent.sandbox.servers import free_port

BINARY = "nats-server"


def available() -> bool:
    return shutil.which(BINARY) is not None


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    store: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NatsCluster:
    """``size`` nodes named n1..nN under ``root``; start()/stop() own the processes."""

    root: Path
    size: int = 3
    name: str = "edge-test"
    nodes: list[NatsNode] = field(default_factory=list)
    # Run in each node before exec (the drill: die with the drill, however it ends).
    preexec: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if not self.nodes:
            for i in range(1, self.size + 1):
                store = self.root / f"n{i}"
                store.mkdir(parents=True, exist_ok=True)
                self.nodes.append(
                    NatsNode(f"n{i}", free_port(), free_port(), store, self.root / f"n{i}.log")
                )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start_node(self, node: NatsNode) -> None:
        if node.running:
            return
        routes = ",".join(
            f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node
        )
        args = [
            BINARY,
            "-a", "127.0.0.1",
            "-p", str(node.client_port),
            "-n", node.name,
            "-js",
            "-sd", str(node.store),
            "--cluster_name", self.name,
            "--cluster", f"nats://127.0.0.1:{node.cluster_port}",
            "--routes", routes,
        ]  # fmt: skip
        with open(node.log, "ab") as out:
            node.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=self.preexec
            )

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    def kill(self, node: NatsNode, sig: int = signal.SIGKILL) -> None:
        """A real signal; waits until the process is gone."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)
            node.proc.wait(timeout=30)

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node, signal.SIGTERM)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll until a stream with one replica per running node can be placed.

        A meta leader alone is not enough: until every node has joined the JetStream
        group, creating an R3 stream fails with "no suitable peers for placement" (seen
        in CI). A throwaway probe stream, placed on all of them and deleted, proves it."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            up = [n.url for n in self.nodes if n.running]
            try:
                nc = await nats.connect(
                    servers=up, connect_timeout=1, allow_reconnect=False, error_cb=quiet_errors
                )
                try:
                    js = nc.jetstream(timeout=2)
                    probe = StreamConfig(
                        name="EDGE_READY_PROBE",
                        subjects=["edge.ready-probe"],
                        num_replicas=len(up),
                        storage=StorageType.MEMORY,
                    )
                    await js.add_stream(probe)
                    await js.delete_stream(probe.name or "")
                    return
                finally:
                    await nc.close()
            except (NatsError, OSError, TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.2)
        raise TimeoutError(f"JetStream cannot place a stream on every node in {timeout_s}s: {last}")


async def quiet_errors(exc: Exception) -> None:
    """nats-py logs every refused reconnect with a traceback unless told otherwise."""


async def read_replica(urls: list[str], node: str, timeout_s: float = 2.0) -> dict[str, Change]:
    """Every order of ``node`` in the replica with its latest state (ReplicaError if not now)."""
    nc = await nats.connect(
        servers=urls, connect_timeout=1, allow_reconnect=False, error_cb=quiet_errors
    )
    try:
        out: dict[str, Change] = {}
        async for batch in states(nc, node, timeout_s):
            out.update((c.record.serial, c) for c in batch)
        return out
    finally:
        await nc.close()
