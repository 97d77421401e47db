"""The drill's table (rich; plain text when not a TTY) and its JSON report."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from agent.drill.runner import Result


def _fig(result: Result, name: str) -> str:
    value = result.figures.get(name)
    return "-" if value is None else f"{value:.2f}s"


def _verdict(r: Result) -> str:
    if r.skipped is not None:
        return "[yellow]SKIPPED[/yellow]"
    return "[green]PASS[/green]" if r.passed else "[bold red]FAIL[/bold red]"


def print_table(results: list[Result]) -> None:
    # Colour only on a terminal; a log file gets plain text at a readable width.
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 110)
    table = Table(title="edge-agent drill", header_style="bold")
    for col in (
        "scenario",
        "result",
        "sent",
        "acked",
        "lost",
        "created twice",
        "sms sent",
        "failover",
        "drain",
        "time",
    ):
        table.add_column(col, justify="left" if col in ("scenario", "result") else "right")
    for r in results:
        table.add_row(
            r.scenario,
            _verdict(r),
            str(r.sent),
            str(r.acked),
            str(len(r.lost)) if not r.lost else f"[red]{len(r.lost)}[/red]",
            str(len(r.duplicated)) if not r.duplicated else f"[red]{len(r.duplicated)}[/red]",
            str(r.sms_sent),
            _fig(r, "failover_s"),
            _fig(r, "drain_s"),
            f"{r.elapsed_s:.1f}s",
        )
    console.print(table)
    for r in results:
        if r.skipped is not None:
            console.print(f"[yellow]{r.scenario} skipped[/yellow]: {r.skipped}")
        if not r.failed:
            continue
        console.print(f"[bold red]{r.scenario} failed[/bold red]: {r.error or ''}")
        if r.lost:
            console.print(f"  lost (acked, never created): {r.lost[:20]}")
        if r.duplicated:
            console.print(f"  created more than once: {dict(list(r.duplicated.items())[:20])}")
        if r.sms_twice:
            console.print(f"  SMS sent twice: {r.sms_twice[:20]}")
        if r.sms_missing > r.sms_ambiguous:
            console.print(
                f"  queued SMS never sent: {r.sms_missing} (ambiguous: {r.sms_ambiguous})"
            )
        if r.acked != r.sent:
            console.print(f"  orders never acknowledged, even after retries: {r.sent - r.acked}")
        if "workdir" in r.figures:
            console.print(f"  logs kept in {r.figures['workdir']}")
    passed = sum(r.passed for r in results)
    skipped = sum(r.skipped is not None for r in results)
    tail = f", {skipped} skipped" if skipped else ""
    console.print(f"{passed} passed, {len(results) - passed - skipped} failed{tail}")


def write_report(results: list[Result], path: str) -> None:
    doc = {
        "passed": not any(r.failed for r in results),
        "skipped": [r.scenario for r in results if r.skipped is not None],
        "scenarios": [r.to_dict() for r in results],
    }
    Path(path).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
