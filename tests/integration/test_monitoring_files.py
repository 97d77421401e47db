"""The dashboard and the alert rules as files: provisioning-ready, every query on metrics the
agent really exports, every alert with a runbook section (issue 21.6, issue 20.3).

The rules' behaviour is promtool's job (ops/prometheus/edge-agent.rules.test.yml, run by
tests/test_prometheus.py -m prometheus); these checks need no Prometheus.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support.chain_fakes import Downstream, chain_section
from tests.support.fakes import FakeCenter
from tests.support.harness import ROOT
from tests.unit.test_docs_links import anchors

DASHBOARD = ROOT / "ops" / "grafana" / "edge-agent.json"
RULES = ROOT / "ops" / "prometheus" / "edge-agent.rules.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# PromQL words that look like metric names but are functions, keywords or labels.
NOT_METRICS = {
    "sum", "by", "on", "and", "or", "rate", "increase", "changes", "histogram_quantile",
    "min_over_time", "time", "job", "instance", "mode", "outcome", "state", "le", "cluster",
    "step", "to", "alertname", "alertstate", "ignoring", "without", "max", "min", "offset",
}  # fmt: skip


def panels() -> list[dict[str, Any]]:
    doc = json.loads(DASHBOARD.read_text())
    return list(doc["panels"])


def test_dashboard_uses_a_datasource_variable_not_inputs() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in doc  # file provisioning has no import step to fill them
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == DATASOURCE
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"], p["title"]


def test_mode_panel_is_coloured_by_mode() -> None:
    mode = next(p for p in panels() if p["title"] == "Mode")
    defaults = mode["fieldConfig"]["defaults"]
    assert defaults["color"]["mode"] != "fixed"
    (mapping,) = defaults["mappings"]
    shown = {v["text"]: v["color"] for v in mapping["options"].values()}
    assert shown == {"normal": "green", "standby": "orange", "offline": "red"}
    # The query gives the number the mappings read: 0 normal, 1 standby, 2 offline.
    expr = mode["targets"][0]["expr"]
    assert 'mode="standby"' in expr and "2 * sum by (instance) (edge_mode{" in expr


def test_dashboard_has_cluster_up_and_a_chain_row() -> None:
    by_title = {p["title"]: p for p in panels()}
    assert "edge_cluster_up" in by_title["Clusters up"]["targets"][0]["expr"]
    rows = [p for p in panels() if p["type"] == "row"]
    assert any("chain" in r["title"].lower() for r in rows)
    chain = [p for p in panels() if "edge_chain_steps" in str(p.get("targets"))]
    assert len(chain) >= 2 and any("overdue" in str(p["targets"]) for p in chain)


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {w for w in words if w not in NOT_METRICS}


async def test_every_dashboard_and_rule_metric_is_exported(make_agent, center: FakeCenter) -> None:
    """Against a real scrape of an agent with [chain] on: no query reads a metric that
    does not exist (an empty panel or an alert that can never fire)."""
    ds = await Downstream(center=center).start()
    try:
        agent = await make_agent(center.url, chain=chain_section(ds))
        _, text = await agent.get("/metrics")
    finally:
        await ds.stop()
    have = exported(text) | {"up", "ALERTS"}  # Prometheus' own
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]
    exprs += re.findall(r"expr: (?:\|\n|>-\n)?((?:.*\n)*?)\s+(?:for|labels):", RULES.read_text())
    assert len(exprs) > 20
    missing = {name for e in exprs for name in metric_names(e) if name not in have}
    assert missing == set(), missing


def test_every_alert_has_a_runbook_section() -> None:
    text = RULES.read_text()
    alerts = re.split(r"\n\s+- alert: ", text)[1:]
    assert alerts and len(alerts) == text.count("- alert: ")  # the split found every rule
    headings = anchors(RUNBOOK)
    for block in alerts:
        name = block.split()[0]
        m = re.search(r'runbook_url: "docs/runbook\.md#([\w-]+)"', block)
        assert m, f"{name} has no runbook_url"
        assert m.group(1) == name.lower(), name
        assert m.group(1) in headings, f"docs/runbook.md has no section #{m.group(1)} for {name}"
