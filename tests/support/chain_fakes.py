"""The TMS / invoicing / ERP trio for chain verification tests: the sandbox's own
(agent/sandbox/downstream.py), with the test defaults of a ``[chain]`` section."""

from __future__ import annotations

from typing import Any

from agent.sandbox.downstream import Downstream, RawNumber, chain_steps

__all__ = ["Downstream", "RawNumber", "chain_section", "chain_steps"]


def chain_section(ds: Downstream, **over: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "deadline_h": 1.0,
        "recheck_interval_s": 0.2,
        "timeout_s": 2.0,
        "concurrency": 4,
        "step": chain_steps(ds),
    }
    section.update(over)
    return section
