"""``edge-agent``: parses the command line and dispatches; nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

from agent import __version__
from agent.config import load_config, resolve_config_path
from agent.errors import ConfigError, DirectoryHeld, PersistError, StartupError, UsageError
from agent.logs import LogWriter, setup_logging
from agent.service.sd_notify import SdNotifier
from agent.service.service import Service
from agent.usage import OneLineParser, pipe_safe, stop_on_signals

log = logging.getLogger("agent")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="edge-agent", description="Order Edge Agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    config_help = "config file (default $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml)"
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help=config_help)
    check = sub.add_parser(
        "check-config",
        help="check a config without running it: keys, directories, secrets, DNS",
        description="Check a config without running the agent: every key, that the "
        "directories exist or can be created and are writable, that secrets are readable, "
        "that the cluster hosts resolve; then print the effective config. Writes nothing. "
        "Exit 0 when fine, 2 on any error.",
    )
    check.add_argument("--config", help=config_help)
    check.add_argument(
        "--user",
        help="check the directories for this user (the unit's User=, e.g. edge-agent) "
        "by owner and mode bits; default: the user running the check",
    )
    status = sub.add_parser("status", help="ask the running agent how it is")
    status.add_argument("--config")
    status.add_argument("--json", action="store_true", help="print the raw JSON status")
    drill = sub.add_parser("drill", help="outage drills in a loopback sandbox")
    drill.add_argument("--scenario", action="append")
    drill.add_argument("--orders", type=int)
    drill.add_argument("--report")
    sandbox = sub.add_parser(
        "sandbox",
        help="run the loopback sandbox alone, for manual drills and a trial agent",
        description="Run the drill's fake order centers, DNS and SMS gateway on loopback "
        "until Ctrl-C, and print an agent config that uses them.",
    )
    sandbox.add_argument(
        "--write-config",
        metavar="DIR",
        help="also write a complete trial config to DIR/agent.toml (state and buffer under "
        "DIR) for: edge-agent run --config DIR/agent.toml",
    )
    sandbox.add_argument(
        "--force", action="store_true", help="overwrite an existing DIR/agent.toml"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return pipe_safe(lambda: _main(argv), prog="edge-agent")


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        if args.command == "run":
            return run(resolve_config_path(args.config))
        if args.command == "status":
            return status(resolve_config_path(args.config), args.json)
        if args.command == "check-config":
            from agent.config_check import check_config

            return check_config(resolve_config_path(args.config), args.user)
        from agent.drill import cli as drill_cli  # the drill's extras load only when drilling

        if args.command == "sandbox":
            return drill_cli.sandbox(args.write_config, args.force)
        return drill_cli.drill(args.scenario, args.orders, args.report)
    except ConfigError as exc:
        print(f"edge-agent: config error: {exc}", file=sys.stderr)
        return 2
    except (UsageError, DirectoryHeld) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return exc.exit_code


def run(config_path: str) -> int:
    cfg = load_config(config_path)
    with setup_logging(cfg.log.level) as logs:
        return asyncio.run(_serve(Service(cfg), config_path, logs))


async def _serve(service: Service, config_path: str, logs: LogWriter) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_on_signals(
        lambda _: stop.set(),
        "edge-agent",
        "stopped at once; every acknowledged order is already on disk or at the center",
        before_exit=lambda: logs.stop(timeout_s=0.5),  # "at once": a stalled reader waits
    )

    def on_hup() -> None:
        if service.reloader is not None:
            service.reloader.trigger()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    notifier = SdNotifier()  # no-op outside systemd
    await notifier.start()  # watchdog pings (if asked for) run from here on
    try:
        await service.start(config_path)
    except DirectoryHeld:
        await notifier.stop()
        raise  # one line, exit 2: another agent owns the buffer; nothing was touched
    except (ConfigError, StartupError):
        await service.stop()
        await notifier.stop()
        raise  # one line; exit 2 (a fix is needed, systemd does not restart it) or 1
    except PersistError as exc:  # a database in state_dir that cannot be opened
        await service.stop()
        await notifier.stop()
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        log.error("agent failed to start: %s", exc, exc_info=True)
        await service.stop()
        await notifier.stop()
        return 1
    _quiet_gc()
    notifier.ready(f"accepting orders on {service.cfg.agent.host}:{service.port}")
    await stop.wait()
    notifier.stopping()
    log.info("stopping: no new orders, finishing in-flight ones (again to stop at once)")
    await service.stop()
    await notifier.stop()
    return 0


def _quiet_gc() -> None:
    """Keep the cyclic GC off the per-order path (perf: ~4% of the agent's CPU under load).

    What start-up allocated lives as long as the process: freeze it, so collections no
    longer traverse it; and collect the young generation every 10,000 allocations
    instead of 700 (an order allocates a few hundred short-lived objects, nearly all
    freed by reference counting). ``EDGE_GC=default`` leaves Python's settings alone.
    """
    if os.environ.get("EDGE_GC", "").lower() == "default":
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(10_000, gen1, gen2)


def status(config_path: str, as_json: bool) -> int:
    """Exit 0 normal, 1 degraded, 3 agent not reachable."""
    cfg = load_config(config_path, tokens=False)  # /status is open: no secret needed
    host = cfg.agent.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.agent.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = orjson.loads(resp.read())
    except (OSError, urllib.error.URLError, orjson.JSONDecodeError) as exc:
        print(f"edge-agent status: agent not reachable at {url}: {exc}", file=sys.stderr)
        return 3
    if as_json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(status_lines(doc)))
    return 0 if doc.get("mode") == "normal" else 1


def status_lines(doc: dict[str, Any]) -> list[str]:
    """The few lines an operator reads first; --json has everything."""
    lines = [f"mode: {doc['mode']} (edge-agent {doc.get('version', '?')})"]
    for name, c in doc.get("clusters", {}).items():
        state = "healthy" if c.get("healthy") else f"DOWN ({c.get('last_error')})"
        lines.append(f"{name}: {state}")
    lines.append(f"pending: {doc['pending']} (oldest {doc['oldest_pending_age_s']:.0f}s)")
    lines.append(f"sms outbox: {doc['sms_outbox']}")
    rejected = doc.get("rejected") or 0
    lines.append(
        f"rejected: {rejected} file(s) to review in rejected/" if rejected else "rejected: 0"
    )
    replica = doc.get("replication")
    if replica:
        health = "healthy" if replica.get("healthy") else f"DOWN ({replica.get('last_error')})"
        held = "" if replica.get("reconciled", True) else "; pending/ held until reconciled"
        lines.append(
            f"replica: {health}, {replica.get('unreplicated', 0)} order(s) not replicated, "
            f"{replica.get('owed_changes', 0)} change(s) owed{held}"
        )
    return lines
