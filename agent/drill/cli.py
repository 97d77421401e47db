"""``edge-agent drill`` and ``edge-agent sandbox``."""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

from agent.drill.agent_proc import config_text
from agent.drill.report import print_table, write_report
from agent.drill.runner import SCENARIOS, run_drills
from agent.drill.sandbox import PRIMARY_NAME, Sandbox
from agent.errors import UsageError


def drill(scenarios: list[str] | None, orders: int | None, report: str | None) -> int:
    names = scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UsageError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    if orders is not None and orders < 10:
        raise UsageError(f"--orders must be at least 10, got {orders}")
    results = asyncio.run(run_drills(names, orders or 200))
    print_table(results)
    if report:
        write_report(results, report)
    return 0 if all(r.passed for r in results) else 1


def sandbox() -> int:
    """Run the sandbox alone for manual drills, with a small control API."""
    return asyncio.run(_sandbox())


async def _sandbox() -> int:
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
    print(
        "agent config:\n"
        f'  [upstream]\n  primary = "{box.primary_url}"\n  standby = "{box.standby_url}"\n'
        f'  nameservers = ["{box.dns.nameserver}"]\n'
        f'  [sms]\n  provider = "http"\n  url = "{box.sms.url}"'
    )
    chain = config_text({"chain": box.chain_section()}).strip()
    print("\n".join("  " + line if line else "" for line in chain.splitlines()))
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await box.stop()
    return 0
