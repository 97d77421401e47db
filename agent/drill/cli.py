"""``edge-agent drill`` and ``edge-agent sandbox``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

from agent.drill import trial
from agent.drill.agent_proc import config_text
from agent.drill.report import print_table, write_report
from agent.drill.runner import SCENARIOS, Result, run_drills
from agent.drill.sandbox import PRIMARY_NAME, Sandbox
from agent.errors import UsageError
from agent.usage import EXIT_INTERRUPTED, stop_on_signals


def drill(scenarios: list[str] | None, orders: int | None, report: str | None) -> int:
    names = scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UsageError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    if orders is not None and orders < 10:
        raise UsageError(f"--orders must be at least 10, got {orders}")
    results = asyncio.run(_drill_until_signal(names, orders or 200))
    if results is None:
        print("edge-agent drill: interrupted; its agent and sandbox are stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_table(results)
    if report:
        write_report(results, report)
    return 1 if any(r.failed for r in results) else 0


async def _drill_until_signal(names: list[str], orders: int) -> list[Result] | None:
    """The drills; None if SIGINT/SIGTERM cut them short (the scenario's agent is stopped
    and the sandbox too, as after a failed scenario). A second signal ends the process at
    once; the drill's agent dies with it (PR_SET_PDEATHSIG)."""
    task = asyncio.current_task()
    assert task is not None
    stopped: list[str] = []

    def stop(signame: str) -> None:
        stopped.append(signame)
        print(
            f"edge-agent drill: {signame}: stopping the drill's agent and sandbox "
            "(again to abort at once)",
            file=sys.stderr,
        )
        task.cancel()

    stop_on_signals(stop, "edge-agent drill", "aborted at once")
    try:
        return await run_drills(names, orders)
    except asyncio.CancelledError:
        if stopped:
            return None
        raise


def sandbox(write_config: str | None = None, force: bool = False) -> int:
    """Run the sandbox alone for manual drills, with a small control API; with
    ``write_config``, also write a trial config for it to DIR/agent.toml."""
    target = None
    if force and write_config is None:
        raise UsageError("--force only goes with --write-config DIR")
    if write_config is not None:
        target = Path(write_config).resolve() / "agent.toml"
        trial.refuse_existing(target, force)  # before anything starts
    return asyncio.run(_sandbox(target, force))


async def _sandbox(target: Path | None, force: bool) -> int:
    stop = asyncio.Event()

    def stopping(signame: str) -> None:
        print(f"edge-agent sandbox: {signame}: stopping (again to stop at once)", file=sys.stderr)
        stop.set()

    stop_on_signals(stopping, "edge-agent sandbox", "stopped at once")
    box = await Sandbox().start()
    app = web.Application()

    async def control(request: web.Request) -> web.Response:
        target, action = request.match_info["target"], request.match_info["action"]
        if target == "dns":
            if action not in box.centers:
                return web.json_response({"error": f"unknown center {action}"}, status=404)
            box.dns.set(PRIMARY_NAME, box.centers[action].host)
            return web.json_response({"primary": box.centers[action].host})
        center = box.centers.get(target)
        if center is None or action not in ("up", "down", "503", "slow"):
            return web.json_response({"error": "unknown center or action"}, status=404)
        if action == "up":
            await center.come_up()
        elif action == "down":
            await center.go_down()
        elif action == "503":
            center.mode = "503"
        else:
            center.delay_s = center.health_delay_s = 3.0
        return web.json_response(
            {"center": target, "action": action, "creates": len(center.creates)}
        )

    app.router.add_post("/control/{target}/{action}", control)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print("edge-agent sandbox (Ctrl-C to stop)")
    for line in box.describe():
        print("  " + line)
    print(
        f"  control  POST http://127.0.0.1:{port}/control/{{primary|standby|spare}}/"
        "{up|down|503|slow}"
    )
    print(f"           POST http://127.0.0.1:{port}/control/dns/{{primary|standby|spare}}")
    try:
        _trial(box, target, force)
    except UsageError:
        await runner.cleanup()
        await box.stop()
        raise
    sys.stdout.flush()
    await stop.wait()
    await runner.cleanup()
    await box.stop()
    return 0


def _trial(box: Sandbox, target: Path | None, force: bool) -> None:
    """Write (or, without --write-config, print) a complete trial config for ``box``."""
    port = trial.trial_port()
    directory = target.parent if target is not None else Path("edge-trial").resolve()
    text = trial.header(box) + config_text(trial.trial_config(directory, box, port))
    if target is None:
        print(f"agent config (save it as {directory}/agent.toml, or use --write-config DIR):")
        print("\n".join("  " + line if line else "" for line in text.rstrip().splitlines()))
        # Optional: chain verification against the sandbox's TMS, invoicing and ERP (their
        # finance step compares the order's "amount", as the drill's orders carry it).
        chain = config_text({"chain": box.chain_section()}).strip()
        print("chain verification against the sandbox's TMS, invoicing and ERP (optional):")
        print("\n".join("  " + line if line else "" for line in chain.splitlines()))
        return
    trial.write_trial_config(target, text, force)
    print(f"trial config: {target} (state and buffer under {directory})")
    print(f"  check it:  edge-agent check-config --config {target}")
    print(f"  run it:    edge-agent run --config {target}")
    print(f"  the agent: http://127.0.0.1:{port}/ (console), POST /v1/orders")
