"""``edge-recover``: parses the command line, resolves config and target, dispatches.

Usage and config errors print one line naming what is wrong and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

from agent import __version__
from agent.chain.steps import load_plugins
from agent.config import Config, load_config, resolve_config_path
from agent.delivery.targets import cluster_of
from agent.errors import ConfigError, UsageError
from agent.usage import OneLineParser, pipe_safe
from recovery.app import EXIT_USAGE, AlreadyRunning, Job, run, stop_event
from recovery.chain import ChainJob, run_chain
from recovery.replica_source import takeover

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="edge-recover", description="Merge an offline buffer directory into the order center."
    )
    p.add_argument("--version", action="version", version=f"edge-recover {__version__}")
    p.add_argument(
        "--path",
        help="buffer directory (DIR/pending/*.json and loose DIR/*.json files); with "
        "--from-replica the work directory, for its checkpoint (default: "
        "agent.state_dir/takeover/NODE_ID)",
    )
    p.add_argument(
        "--from-replica",
        metavar="NODE_ID",
        help="merge a lost server's orders from the NATS JetStream replica "
        "([replication] in --config) instead of a directory",
    )
    p.add_argument("--mode", required=True, choices=("merge", "dry-run", "verify", "chain"))
    p.add_argument(
        "--config",
        help="agent config (default $EDGE_AGENT_CONFIG, then "
        "/etc/edge-agent/agent.toml); gives the target and node id",
    )
    p.add_argument("--target", help="order center base URL (default: upstream.primary)")
    p.add_argument(
        "--concurrency",
        type=int,
        help="requests in flight (32; chain: at most [chain] concurrency)",
    )
    p.add_argument("--rate", type=float, help="at most N orders per second (default: no cap)")
    p.add_argument(
        "--batch",
        type=int,
        default=100,
        help="orders per orders:batch request (100; 1 forces single POSTs)",
    )
    p.add_argument("--report", help="write a JSON report to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    return pipe_safe(lambda: _main(argv), prog="edge-recover")


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="edge-recover: %(message)s")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        if args.from_replica:
            return _from_replica(args)
        if not args.path:
            raise UsageError("pass --path DIR (a buffer directory) or --from-replica NODE_ID")
        if args.mode == "chain":
            chain_job = _chain_job(args)
            return asyncio.run(_chain(chain_job))
        job = _job(args)
        return asyncio.run(run(job))
    except (ConfigError, UsageError, AlreadyRunning) as exc:
        print(f"edge-recover: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _from_replica(args: argparse.Namespace) -> int:
    node = args.from_replica
    if not _NODE_ID.match(node):
        raise UsageError(f"--from-replica {node!r} is not a node id (letters, digits, '-')")
    if args.mode == "chain":
        raise UsageError("--mode chain checks DIR/merged: pass --path DIR, not --from-replica")
    cfg = load_config(resolve_config_path(args.config), tokens=False)
    if not cfg.replication.servers:
        raise UsageError(f"--from-replica needs [replication] servers in the config ({cfg.source})")
    work = Path(args.path) if args.path else Path(cfg.agent.state_dir) / "takeover" / node
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    args.path = str(work)
    job = dataclasses.replace(_job(args), node=node)
    return asyncio.run(takeover(job, cfg.replication, node, cfg.source))


def _job(args: argparse.Namespace) -> Job:
    root = Path(args.path)
    if not root.is_dir():
        raise UsageError(f"--path {args.path}: not a directory")
    _check_concurrency(args)
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if args.rate is not None and not args.rate > 0:
        raise UsageError("--rate must be > 0 orders per second")
    cfg = _config(args.config, need=args.target is None)
    target = args.target or (cfg.upstream.primary if cfg else "")
    clusters = tuple(
        (name, url.rstrip("/"))
        for name, url in (
            ("primary", cfg.upstream.primary if cfg else ""),
            ("standby", cfg.upstream.standby if cfg else ""),
        )
        if url
    )
    # The target's cluster decides which pinned orders it may take (CONTRACT 5): the
    # configured cluster with this URL (spelled alike once normalised); the primary by
    # default; none for another URL, which is then what unclear answers pin orders to.
    cluster = "primary" if args.target is None else cluster_of(target, dict(clusters))
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--target {target!r} is not an http(s) URL")
    return Job(
        root=root.resolve(),
        mode=args.mode,
        target=target.rstrip("/"),
        node=cfg.agent.node_id if cfg else "X",
        timeout_s=cfg.upstream.timeout_s if cfg else 5.0,
        nameservers=cfg.upstream.nameservers if cfg else (),
        concurrency=args.concurrency or 32,
        rate=args.rate,
        batch=args.batch,
        report=_report(args),
        cluster=cluster,
        clusters=clusters,
    )


def _check_concurrency(args: argparse.Namespace) -> None:
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")


def _report(args: argparse.Namespace) -> Path | None:
    report = Path(args.report) if args.report else None
    if report is not None and not report.parent.is_dir():
        raise UsageError(f"--report {args.report}: directory {report.parent} does not exist")
    return report


def _chain_job(args: argparse.Namespace) -> ChainJob:
    """--mode chain: the steps come from the config's [chain] (its `enabled` is the agent's
    business); the checks go to the step URLs, so --target means nothing here."""
    root = Path(args.path)
    if not root.is_dir():
        raise UsageError(f"--path {args.path}: not a directory")
    if args.target is not None:
        raise UsageError("--target is not used by --mode chain: the steps name their systems")
    _check_concurrency(args)
    path = resolve_config_path(args.config)
    if args.config is None and not Path(path).exists():
        raise UsageError(
            f"--mode chain needs the [chain] steps: pass --config PATH (no config file at {path})"
        )
    cfg = load_config(path, tokens=False)
    if not cfg.chain.steps:
        raise UsageError(f"{path}: no [[chain.step]] configured: nothing to verify")
    return ChainJob(
        root=root.resolve(),
        cfg=cfg.chain,
        plugins=load_plugins(cfg.chain.steps),  # a bad step class: exit 2 before any work
        concurrency=min(cfg.chain.concurrency, args.concurrency or cfg.chain.concurrency),
        report=_report(args),
        source=path,
    )


async def _chain(job: ChainJob) -> int:
    return await run_chain(job, stop_event())


def _config(arg: str | None, need: bool) -> Config | None:
    """--config must load; the default path is used if it exists (required without --target)."""
    path = resolve_config_path(arg)
    if arg is None and not Path(path).exists():
        if need:
            raise UsageError(
                f"no target: pass --target URL or --config PATH (no config file at {path})"
            )
        return None
    return load_config(path, tokens=False)  # it serves no API: never handed tokens
