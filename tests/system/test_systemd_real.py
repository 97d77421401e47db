"""The service as operators run it: the documented install block under a real systemd 252.

A Debian 12 root filesystem (debootstrap, cached in /var/cache/order-edge-agent) is booted
with systemd-nspawn (tests/support/systemd_container.py). Inside, docs/operations.md's "Running
under systemd" install block runs line by line, verbatim, in a copy of this checkout, with the
wheel built from it in dist/. pip inside the container installs from a wheelhouse that the
host filled with ``pip wheel`` (PIP_NO_INDEX / PIP_FIND_LINKS, pip's own settings): the host
talks to the package index through its pip cache and config, the container needs no network.
(Tried: pip inside the container reaches pypi.org but fails TLS verification where the host
reaches the registry through a CA the fresh root does not trust; offline from a wheelhouse
it installs in ~6 s, the same way every time.)

The container shares the host's network: the agent listens on the host's loopback and the
fake order center (tests/support/systemd_center.py) runs in this process. The agent is driven only
through systemctl, its console scripts, its config files and HTTP.

The tests run in file order and build on each other (one booted container per module).
CI: ``pytest -m systemd_real`` as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.support.packaging_build import REPO, build_wheel, run
from tests.support.systemd_center import Center
from tests.support.systemd_container import Container, booted, ensure_host_tools, log, rootfs

pytestmark = [pytest.mark.systemd_real, pytest.mark.timeout(900)]

CHECKOUT = "/root/edge-agent"  # the copy of this checkout inside the container
TOKEN = "tok-systemd-real-7f3a"
UNIT = "edge-agent.service"
SPOOL = "/var/spool/edge-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll check() until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except (OSError, AssertionError, ValueError) as exc:  # not there yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def seconds(span: str) -> float:
    """A systemd time span as printed by systemctl show ("10s", "1min 30s", "500ms")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(us|ms|s|min|h)", span):
        total += float(num) * units[unit]
    assert total > 0, f"cannot parse time span {span!r}"
    return total


OPERATIONS = REPO / "docs" / "operations.md"  # where operators read the install steps


def readme_install_block() -> list[str]:
    """The command lines of the documented install block, comments stripped."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text[text.index("## Running under systemd") :]
    section = section[section.index("**Install on a warehouse server**") :]
    block = section[section.index("```sh\n") + 6 :]
    block = block[: block.index("```")]
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line]


def readme_journal_commands() -> list[str]:
    """The documented journalctl pipelines for the agent's JSON log (inline code spans)."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text[text.index("## Running under systemd") :]
    section = section[: section.index("\n## ", 5)]
    cmds = re.findall(r"`(journalctl [^`]*\| *jq\b[^`]*)`", section)
    assert cmds, "no `journalctl ... | jq ...` command in docs/operations.md's systemd section"
    return cmds


def edit_toml(text: str, changes: dict[tuple[str, str], str]) -> str:
    """Set existing keys in a TOML file the way an operator edits it (the key must exist)."""
    out, section, seen = [], "", set()
    for line in text.splitlines():
        m = re.match(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
        m = re.match(r"(\w+)\s*=", line)
        if m and (section, m.group(1)) in changes:
            line = f"{m.group(1)} = {changes[(section, m.group(1))]}"
            seen.add((section, m.group(1)))
        out.append(line)
    missing = set(changes) - seen
    assert not missing, f"keys not in the example config: {missing}"
    return "\n".join(out) + "\n"


@dataclass
class Stack:
    ct: Container
    center: Center
    port: int
    example_config: str = ""
    acked: dict[str, int] = field(default_factory=dict)  # load test: dedupe key -> status
    order_seq: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self, primary: str) -> str:
        return edit_toml(
            self.example_config,
            {
                ("agent", "node_id"): '"wh-ct-01"',
                ("agent", "listen"): f'"127.0.0.1:{self.port}"',
                ("buffer", "scan_interval_s"): "1",
                ("upstream", "primary"): json.dumps(primary),
                ("upstream", "standby"): '""',
                ("upstream", "timeout_s"): "2",
                ("health", "interval_s"): "0.2",
                ("health", "timeout_s"): "0.5",
                ("health", "unhealthy_threshold"): "2",
                ("health", "healthy_threshold"): "1",
                ("sms", "provider"): '"log"',
            },
        )

    # -- HTTP ---------------------------------------------------------------------------
    def http(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = TOKEN
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def order(self, prefix: str) -> tuple[str, dict[str, Any]]:
        self.order_seq += 1
        body = {
            "channel_id": "ct",
            "channel_order_id": f"{prefix}-{self.order_seq}",
            "amount": "199.10",
            "items": [{"sku": "A-1", "qty": 2}],
        }
        return f"ct:{prefix}-{self.order_seq}", body

    def status(self) -> dict[str, Any]:
        code, body = self.http("GET", "/status")
        assert code == 200, (code, body)
        return body

    # -- systemd ------------------------------------------------------------------------
    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        return self.ct.show(unit, *props)

    def journal_mark(self) -> str:
        """A point in the journal: now, as a realtime timestamp (container and host share the
        clock); journalctl --since=@T is realtime-based and needs no cursor arithmetic."""
        return f"@{time.time():.3f}"

    def journal_since(self, since: str, *args: str) -> str:
        return self.ct.sh(f"journalctl --since={since} -o cat " + " ".join(args)).stdout

    def pending(self) -> dict[str, str]:
        """pending/ in the spool: file name -> dedupe_key (read as root inside)."""
        script = (
            "import glob, json, os; print(json.dumps({os.path.basename(f): "
            "json.load(open(f))['dedupe_key'] "
            f"for f in glob.glob('{SPOOL}/pending/*.json')}}))"
        )
        out = self.ct.sh(f"python3 -c {shlex.quote(script)}").stdout
        return json.loads(out)

    def write_config(self, text: str) -> None:
        self.ct.write("/etc/edge-agent/agent.toml", text, mode="0644")

    def ensure_running(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.ct.sh(
                f"systemctl reset-failed {UNIT} || true; systemctl start {UNIT}", timeout=120
            )
        code, _ = self.http("GET", "/readyz")
        assert code == 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.fail("systemd_real needs root (systemd-nspawn, debootstrap)")
    t0 = time.monotonic()
    ensure_host_tools()
    rootfs()
    log(f"host tools + root filesystem ready in {time.monotonic() - t0:.0f} s")
    work = tmp_path_factory.mktemp("systemd_real")
    t1 = time.monotonic()
    wheel = build_wheel(work / "build")
    wheels = work / "wheelhouse"
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(wheel)],
        cwd=work,
        timeout=600,
    )
    log(
        f"wheel + wheelhouse ({len(list(wheels.iterdir()))} wheels) in "
        f"{time.monotonic() - t1:.0f} s"
    )
    # The documented offline path: the bundle, built with its one command on the host.
    t2 = time.monotonic()
    bundles = work / "bundle"
    run([str(REPO / "ops" / "offline" / "build-bundle.sh"), str(bundles)], cwd=work, timeout=600)
    log(f"offline bundle in {time.monotonic() - t2:.0f} s")
    center = Center(free_port())
    center.up()
    try:
        with booted(
            {str(REPO): "/src", str(wheels): "/wheels", str(bundles): "/bundle"},
            work / "console.log",
        ) as ct:
            # The wheelhouse holds wheels for this interpreter: the container's must match.
            theirs = ct.sh("python3 -c 'import sys; print(*sys.version_info[:2])'").stdout
            ours = f"{sys.version_info[0]} {sys.version_info[1]}"
            assert theirs.strip() == ours, (
                f"container python {theirs}, host {ours}: "
                "the host's pip wheel built for the wrong interpreter"
            )
            # The operator's checkout: a writable copy of this one, with the wheel in dist/.
            ct.sh(
                f"mkdir -p {CHECKOUT} && cd /src && tar --exclude=./.venv --exclude=./.git "
                f"--exclude='__pycache__' --exclude=./build --exclude=./dist -cf - . "
                f"| tar -C {CHECKOUT} -xf - && mkdir -p {CHECKOUT}/dist "
                f"&& cp /wheels/{wheel.name} {CHECKOUT}/dist/"
            )
            yield Stack(ct, center, free_port())
            log(f"container stage: {time.monotonic() - t0:.0f} s in all")
    finally:
        center.close()


def test_readme_install_block_runs_verbatim_and_start_returns_when_ready(stack: Stack) -> None:
    ct = stack.ct
    lines = readme_install_block()
    ran: list[str] = []
    for line in lines:
        if line.startswith("editor "):
            target = line.split()[1]
            if target == "/etc/edge-agent/agent.toml":
                stack.example_config = ct.sh(f"cat {target}").stdout
                stack.write_config(stack.config(stack.center.base))
            elif target == "/etc/edge-agent/tokens":
                mode = ct.sh(f"stat -c '%U:%G %a' {target}").stdout.strip()
                assert mode == "root:root 600", f"{target} is {mode}, not root-only"
                ct.write(target, TOKEN + "\n", mode="0600")
            else:
                raise AssertionError(f"the docs edit {target}: the test does not know it")
            ran.append(line)
            continue
        t = time.monotonic()
        # Where pip finds packages is pip's own setting (environment), not the docs.
        proc = ct.sh(
            line, cwd=CHECKOUT, timeout=300, env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"}
        )
        log(f"docs: {line}  ({time.monotonic() - t:.1f} s)")
        ran.append(line)
        if line == "systemctl enable --now edge-agent":
            # Type=notify: start returned, so READY=1 came; no polling here on purpose.
            props = stack.show("ActiveState", "SubState", "StatusText")
            assert props["ActiveState"] == "active" and props["SubState"] == "running", props
            assert props["StatusText"] == f"accepting orders on 127.0.0.1:{stack.port}", props
            assert stack.http("GET", "/readyz") == (200, {"ready": True})
        elif line == "systemctl status edge-agent":
            assert f'Status: "accepting orders on 127.0.0.1:{stack.port}"' in proc.stdout, (
                proc.stdout
            )
        elif line.endswith("edge-agent status"):
            assert "mode: normal" in proc.stdout, proc.stdout
    for needed in ("systemd/install.sh", "systemctl enable --now edge-agent"):
        assert any(line.startswith(needed) for line in ran), f"the install block lost {needed!r}"
    assert any(line.startswith("editor /etc/edge-agent/agent.toml") for line in ran)
    # What the install made: the user, the spool, the units, the secrets root-only.
    assert ct.sh("stat -c '%U %a' /var/spool/edge-agent").stdout.strip() == "edge-agent 700"
    assert ct.sh("stat -c '%U %a' /var/lib/edge-agent").stdout.strip() == "edge-agent 700"
    assert ct.sh("stat -c '%U:%G %a' /etc/edge-agent/sms").stdout.strip() == "root:root 600"
    assert stack.show("User", "UnitFileState") == {"User": "edge-agent", "UnitFileState": "enabled"}


def test_rerunning_install_upgrades_and_keeps_the_operators_files(stack: Stack) -> None:
    """docs/operations.md: "It never overwrites a file in /etc/edge-agent; rerun it to upgrade"."""
    before = stack.ct.sh("cat /etc/edge-agent/agent.toml /etc/edge-agent/tokens").stdout
    assert TOKEN in before and f"127.0.0.1:{stack.port}" in before
    stack.ct.sh(
        "systemd/install.sh dist/order_edge_agent-*.whl",
        cwd=CHECKOUT,
        timeout=300,
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"},
    )
    assert stack.ct.sh("cat /etc/edge-agent/agent.toml /etc/edge-agent/tokens").stdout == before
    assert stack.show("ActiveState")["ActiveState"] == "active"


def test_forwarded_with_the_token_from_the_credential(stack: Stack) -> None:
    stack.ensure_running()
    key, body = stack.order("fwd")
    code, answer = stack.http("POST", "/v1/orders", body, token=None)
    assert code == 401, (code, answer)
    code, answer = stack.http("POST", "/v1/orders", body, token="wrong")
    assert code == 401, (code, answer)
    code, answer = stack.http("POST", "/v1/orders", body)
    assert code == 201 and answer["status"] == "forwarded", (code, answer)
    assert answer["cluster"] == "primary"
    assert stack.center.has(key)
    assert json.loads(stack.center.orders[key][1]) == body


def test_buffered_while_the_center_is_down(stack: Stack) -> None:
    stack.ensure_running()
    stack.center.down()
    wait_for("/status mode offline", lambda: stack.status()["mode"] == "offline", 15)
    key, body = stack.order("buf")
    code, answer = stack.http("POST", "/v1/orders", body)
    assert code == 202 and answer["status"] == "buffered", (code, answer)
    assert f"{answer['serial']}.json" in stack.pending()
    assert stack.pending()[f"{answer['serial']}.json"] == key
    assert not stack.center.has(key)


def test_kill_9_restarts_and_the_buffered_order_survives_and_drains(stack: Stack) -> None:
    stack.ensure_running()
    assert not stack.center.is_up, "the previous test leaves the center down"
    pending = stack.pending()
    assert pending, "expected the buffered order of the previous test"
    before = stack.show("MainPID", "NRestarts")
    stack.ct.sh(f"kill -9 {before['MainPID']}")

    def restarted() -> bool:
        now = stack.show("MainPID", "NRestarts", "ActiveState")
        return (
            int(now["NRestarts"]) > int(before["NRestarts"])
            and now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", before["MainPID"])
        )

    wait_for("restart after kill -9 (RestartSec=5s)", restarted, 30)
    assert stack.http("GET", "/readyz")[0] == 200  # active means READY=1 came again
    assert stack.pending() == pending
    for name, key in pending.items():
        code, answer = stack.http("GET", f"/v1/orders/{name.removesuffix('.json')}")
        assert code == 200 and answer["state"] == "buffered", (code, answer)
        assert not stack.center.has(key)
    stack.center.up()
    wait_for(
        "buffered orders at the center",
        lambda: all(stack.center.has(k) for k in pending.values()),
        30,
    )
    wait_for("pending/ empty after the drain", lambda: not stack.pending(), 30)
    for name in pending:
        code, answer = stack.http("GET", f"/v1/orders/{name.removesuffix('.json')}")
        assert code == 200 and answer["state"] == "merged", (code, answer)
    assert all(n == 1 for n in stack.center.creates.values()), stack.center.creates


def test_reload_applies_a_config_change(stack: Stack) -> None:
    """``systemctl reload`` (ExecReload: kill -HUP) applies a new upstream.primary.

    First the new file is bind-mounted over agent.toml: a mount makes no inotify event, so
    the agent's own file watch cannot see it and only the SIGHUP can make /status follow.
    Then the operator's way back: edit the file, ``systemctl reload``.
    """
    stack.ensure_running()
    stack.center.up()
    before = stack.show("MainPID", "NRestarts")
    other = Center(free_port())
    other.up()
    try:
        stack.ct.write("/root/agent-other.toml", stack.config(other.base))
        stack.ct.sh("mount --bind /root/agent-other.toml /etc/edge-agent/agent.toml")
        assert stack.status()["clusters"]["primary"]["url"] == stack.center.base
        stack.ct.sh("systemctl reload edge-agent")
        wait_for(
            "/status: primary is the new center and healthy",
            lambda: (
                stack.status()["clusters"]["primary"]["url"] == other.base
                and stack.status()["clusters"]["primary"]["healthy"]
            ),
            15,
        )
        key, body = stack.order("reload")
        code, answer = stack.http("POST", "/v1/orders", body)
        assert code == 201, (code, answer)
        assert other.has(key) and not stack.center.has(key)
    finally:
        stack.ct.sh("umount /etc/edge-agent/agent.toml", check=False)
        other.close()
    stack.write_config(stack.config(stack.center.base))
    stack.ct.sh("systemctl reload edge-agent")
    wait_for(
        "/status: primary back to the first center",
        lambda: (
            stack.status()["clusters"]["primary"]["url"] == stack.center.base
            and stack.status()["clusters"]["primary"]["healthy"]
        ),
        15,
    )
    assert stack.show("MainPID", "NRestarts") == before, "reload restarted the agent"


def test_watchdog_kills_a_wedged_agent_and_it_is_restarted(stack: Stack) -> None:
    stack.ensure_running()
    props = stack.show("MainPID", "NRestarts", "WatchdogUSec", "RestartUSec")
    watchdog = seconds(props["WatchdogUSec"])
    assert watchdog == 10, props  # the unit's WatchdogSec=10s
    since = stack.journal_mark()
    t = time.monotonic()
    stack.ct.sh(f"kill -STOP {props['MainPID']}")  # the loop sends no WATCHDOG=1 any more

    def restarted() -> bool:
        now = stack.show("MainPID", "NRestarts", "ActiveState")
        return (
            int(now["NRestarts"]) > int(props["NRestarts"])
            and now["ActiveState"] == "active"
            and now["MainPID"] != props["MainPID"]
        )

    wait_for(
        "restart after the watchdog timeout",
        restarted,
        watchdog + seconds(props["RestartUSec"]) + 30,
        interval=0.5,
    )
    took = time.monotonic() - t
    assert took >= watchdog, f"restarted after {took:.1f} s, before WatchdogSec"
    journal = stack.journal_since(since, "-u", UNIT)
    assert f"{UNIT}: Watchdog timeout (limit 10s)!" in journal, (
        journal,
        stack.ct.sh(f"journalctl -u {UNIT} -o short-precise | tail -n 40").stdout,
    )
    assert f"Killing process {props['MainPID']} (edge-agent) with signal SIGABRT" in journal, (
        journal
    )
    assert stack.http("GET", "/readyz")[0] == 200


def test_stop_under_load_loses_no_acknowledged_order(stack: Stack) -> None:
    """8 clients send orders without pause: 100+ forwarded, then the center goes down and
    100+ are buffered, then ``systemctl stop`` while they keep sending. Every order that got
    a 2xx must be at the center or in pending/ afterwards, none created twice."""
    stack.ensure_running()
    stack.center.up()
    wait_for("mode normal", lambda: stack.status()["mode"] == "normal", 15)
    acked: dict[str, int] = {}
    refused: list[str] = []
    stop_done = asyncio.Event()
    stopping = asyncio.Event()

    async def client(session: aiohttp.ClientSession, next_id: Iterator[int]) -> None:
        while not stop_done.is_set():
            i = next(next_id)
            if i >= 5000:
                return
            body = {"channel_id": "load", "channel_order_id": str(i), "amount": "1.00"}
            try:
                async with session.post(
                    f"{stack.url}/v1/orders",
                    json=body,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as r:
                    await r.read()
                    if 200 <= r.status < 300:
                        acked[f"load:{i}"] = r.status
                    elif stopping.is_set():
                        refused.append(f"{r.status}")
                    else:
                        raise AssertionError(f"order {i}: {r.status} before the stop")
            except aiohttp.ClientError as exc:
                if not stopping.is_set():
                    raise
                refused.append(type(exc).__name__)
                await asyncio.sleep(0.01)

    async def load() -> subprocess.CompletedProcess[str]:
        ids = iter(range(10**9))
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            clients = [asyncio.create_task(client(session, ids)) for _ in range(8)]

            async def until(what: str, cond: Callable[[], bool]) -> None:
                deadline = time.monotonic() + 60
                while not cond():
                    failed = [c.exception() for c in clients if c.done() and c.exception()]
                    assert not failed, f"load client failed while waiting for {what}: {failed}"
                    assert time.monotonic() < deadline, f"load: no {what} in 60 s"
                    await asyncio.sleep(0.01)

            await until("100 forwarded orders", lambda: len(acked) >= 100)
            await asyncio.to_thread(stack.center.down)
            await until(
                "100 buffered orders", lambda: sum(1 for s in acked.values() if s == 202) >= 100
            )
            stopping.set()
            stop = await asyncio.to_thread(stack.ct.sh, "systemctl stop edge-agent", timeout=60)
            stop_done.set()
            await asyncio.gather(*clients)
            return stop

    asyncio.run(load())
    props = stack.show("ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    assert refused, "no request met the stop: the load ended before it"
    pending = set(stack.pending().values())
    lost = [k for k in acked if not stack.center.has(k) and k not in pending]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged orders lost: {lost[:10]}"
    assert all(n == 1 for n in stack.center.creates.values())
    forwarded = sum(1 for s in acked.values() if s == 201)
    log(
        f"stop under load: {len(acked)} acknowledged ({forwarded} forwarded, "
        f"{len(acked) - forwarded} buffered), {len(refused)} refused during the stop; "
        f"{len(pending)} in pending/"
    )
    stack.acked = acked


def test_edge_recover_units_merge_the_services_buffer(stack: Stack) -> None:
    assert stack.show("ActiveState")["ActiveState"] == "inactive"  # left so by the stop test
    pending = stack.pending()
    assert pending, "the stop test left no buffered orders"
    stack.center.up()
    stack.ct.sh("systemctl start edge-recover@dry-run", timeout=120)
    report = json.loads(stack.ct.sh("cat /var/lib/edge-agent/recover-dry-run.json").stdout)
    assert report["summary"]["mode"] == "dry-run"
    assert report["summary"]["files"] == len(pending), report["summary"]
    assert stack.pending() == pending, "dry-run changed the buffer"
    assert not any(stack.center.has(k) for k in pending.values())
    mark = stack.journal_mark()
    stack.ct.sh("systemctl start edge-recover@merge", timeout=300)
    # The merge's mover process ran in the unit's sandbox: a mover that could not start
    # or died would leave "no mover process" or "the mover process ended" here.
    merge_log = stack.journal_since(mark, "-u", "edge-recover@merge")
    assert "mover process" not in merge_log, merge_log[-2000:]
    report = json.loads(stack.ct.sh("cat /var/lib/edge-agent/recover-merge.json").stdout)
    s = report["summary"]
    assert s["mode"] == "merge" and s["created"] + s["duplicate"] == len(pending), s
    assert stack.pending() == {}
    assert all(stack.center.has(k) for k in pending.values())
    assert all(stack.center.has(k) for k in stack.acked), "an acknowledged order is missing"
    assert all(n == 1 for n in stack.center.creates.values())
    stack.ct.sh("systemctl start edge-recover@verify", timeout=120)
    report = json.loads(stack.ct.sh("cat /var/lib/edge-agent/recover-verify.json").stdout)
    log(f"edge-recover@verify: {report['summary']}")
    s = report["summary"]
    assert s["mode"] == "verify" and s["missing"] == s["different"] == s["error"] == 0, s
    assert s["ok"] == s["total"] >= len(pending), s
    owner = stack.ct.sh("stat -c '%U %a' /var/lib/edge-agent/recover-merge.json").stdout.strip()
    assert owner == "edge-agent 600", owner


def test_config_error_fails_with_exit_2_and_is_not_restarted(stack: Stack) -> None:
    stack.ensure_running()
    good = stack.config(stack.center.base)
    bad = good.replace("[agent]\n", "[agent]\nbogus_key = 1\n", 1)
    assert bad != good
    stack.write_config(bad)
    since = stack.journal_mark()
    try:
        proc = stack.ct.sh("systemctl restart edge-agent", check=False, timeout=120)
        assert proc.returncode != 0, "restart with an unknown key succeeded"
        props = stack.show("ActiveState", "Result", "ExecMainStatus", "NRestarts", "RestartUSec")
        assert props["ActiveState"] == "failed" and props["ExecMainStatus"] == "2", props
        # Not restarted: still failed well past RestartSec (a restart would show up as
        # activating/auto-restart or a higher NRestarts), polled the whole time.
        window = time.monotonic() + seconds(props["RestartUSec"]) + 3
        while time.monotonic() < window:
            now = stack.show("ActiveState", "NRestarts")
            assert now == {"ActiveState": "failed", "NRestarts": props["NRestarts"]}, now
            time.sleep(0.5)
        journal = stack.journal_since(since, f"_SYSTEMD_UNIT={UNIT}")
        assert "unknown key agent.bogus_key" in journal, journal
    finally:
        stack.write_config(good)
    stack.ct.sh("systemctl reset-failed edge-agent && systemctl start edge-agent", timeout=120)
    assert stack.http("GET", "/readyz")[0] == 200


def test_offline_bundle_installs_the_service_with_no_network(stack: Stack) -> None:
    """docs/operations.md "Offline install": unpack the bundle, ./install.sh with no network at all
    (a network namespace holding only lo), restart: the service runs the bundle's agent.

    The server has no python3-venv (no ensurepip) and no /opt/edge-agent yet, as a stock
    Debian 12 that never saw the online install: the bundle must make the venv itself.
    """
    ct = stack.ct
    stack.ensure_running()
    ct.sh(
        f"systemctl stop {UNIT} && rm -rf /opt/edge-agent "
        "&& dpkg --purge python3-venv python3.11-venv",
        timeout=120,
    )
    assert ct.sh("python3 -c 'import ensurepip'", check=False).returncode != 0
    ct.sh(
        "rm -rf /root/offline && mkdir /root/offline && cd /root/offline "
        "&& tar xzf /bundle/order-edge-agent-*-offline-*.tar.gz"
    )
    links = ct.sh("unshare --net sh -c 'tail -n +3 /proc/net/dev'").stdout.split()
    assert links[0] == "lo:" and not [w for w in links if w.endswith(":") and w != "lo:"]
    before = stack.ct.sh("cat /etc/edge-agent/agent.toml /etc/edge-agent/tokens").stdout
    proc = ct.sh(
        "cd /root/offline/order-edge-agent-*-offline-*/ && unshare --net ./install.sh",
        timeout=300,
        env={"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},
    )
    assert "systemd/install.sh: installed edge-agent" in proc.stdout, proc.stdout
    assert stack.ct.sh("cat /etc/edge-agent/agent.toml /etc/edge-agent/tokens").stdout == before
    # Nothing was installed with dpkg: still no ensurepip, the venv's pip is the bundle's.
    assert ct.sh("python3 -c 'import ensurepip'", check=False).returncode != 0
    pip = ct.sh("/opt/edge-agent/bin/pip --version").stdout.split()[1]
    assert (
        ct.sh(
            f"ls /root/offline/order-edge-agent-*-offline-*/wheels/pip-{pip}-*.whl", check=False
        ).returncode
        == 0
    ), pip
    ct.sh(f"systemctl restart {UNIT}", timeout=120)
    assert stack.http("GET", "/readyz") == (200, {"ready": True})
    with urllib.request.urlopen(stack.url + "/", timeout=10) as resp:  # the console
        assert resp.status == 200 and b"console.js" in resp.read()
    key, body = stack.order("offline")
    code, answer = stack.http("POST", "/v1/orders", body)
    assert code in (201, 202), (code, answer)
    assert (code == 201) == stack.center.has(key), (code, answer)


def test_readme_journal_commands_give_only_the_agents_json(stack: Stack) -> None:
    """Runs last: the journal then holds starts, reloads, kill -9, a watchdog kill, a stop
    under load and a config error."""
    raw = stack.ct.sh(f"journalctl _SYSTEMD_UNIT={UNIT} -o cat").stdout.splitlines()
    plain = [line for line in raw if not line.startswith("{")]
    # The one non-JSON line is the config error reason, printed before logging starts.
    assert all(line.startswith("edge-agent: config error:") for line in plain), plain
    objects = [json.loads(line) for line in raw if line.startswith("{")]
    assert len(objects) > 20 and all({"ts", "level", "msg"} <= set(o) for o in objects)
    for cmd in readme_journal_commands():
        if " -f " in cmd:  # follows forever: a few seconds, no jq error
            proc = stack.ct.sh(f"timeout 3 sh -c {shlex.quote(cmd)}", check=False)
            assert proc.returncode == 124 and not proc.stderr.strip(), (cmd, proc)
            continue
        proc = stack.ct.sh(cmd)
        values, dec, text, i = [], json.JSONDecoder(), proc.stdout, 0
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i == len(text):
                break
            value, i = dec.raw_decode(text, i)
            values.append(value)
        assert len(values) == len(raw), (cmd, len(values), len(raw))
        assert [v for v in values if isinstance(v, dict)] == objects, cmd
        assert [v for v in values if not isinstance(v, dict)] == plain, cmd
        assert not any("edge-agent.service" in str(v) for v in values), cmd
