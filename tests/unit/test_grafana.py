"""metrics/grafana/tcpcopy-mp.json: every query uses series the exporters really expose."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from intercept.server import new_counters
from metrics.counters import CounterBlock
from metrics.exporter import InterceptCollector, TcpcopyCollector

DASHBOARD = Path(__file__).resolve().parents[2] / "metrics" / "grafana" / "tcpcopy-mp.json"
METRIC = re.compile(r"\b(?:tcpcopy|intercept)_[a-z0-9_]+\b")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Sample name -> label names, from what the collectors yield for a fresh block."""
    block = CounterBlock.create(workers=2)
    try:
        out: dict[str, set[str]] = {}
        for collector in (TcpcopyCollector(block.snapshot), InterceptCollector(new_counters())):
            for fam in collector.collect():
                for s in fam.samples:
                    out.setdefault(s.name, set()).update(s.labels)
        return out
    finally:
        block.close()
        block.unlink()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _walk(node, key: str):
    """Every value stored under ``key`` anywhere in the JSON."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _targets(dashboard: dict) -> list[dict]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_expr_uses_only_exposed_series(dashboard, exposed):
    exprs = list(_walk(dashboard, "expr"))
    assert len(exprs) >= 10
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used, f"no tcpcopy/intercept series in {expr!r}"
        assert used <= set(exposed), f"{sorted(used - set(exposed))} in {expr!r}"


def test_template_queries_use_exposed_series(dashboard, exposed):
    variables = dashboard["templating"]["list"]
    queries = [v["definition"] for v in variables if v["type"] == "query"]
    assert queries
    for q in queries:
        used = set(METRIC.findall(q))
        assert used and used <= set(exposed), q


def test_grouping_and_legend_labels_exist_on_the_series(dashboard, exposed):
    for target in _targets(dashboard):
        expr = target["expr"]
        labels = set(TARGET_LABELS)
        for name in METRIC.findall(expr):
            labels |= exposed[name]
        for group in BY.findall(expr):
            grouped = {g.strip() for g in group.split(",") if g.strip()}
            assert grouped <= labels, f"{sorted(grouped - labels)} in {expr!r}"
        legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
        assert legend <= labels, f"legend {sorted(legend - labels)} for {expr!r}"


def test_every_exposed_series_is_charted(dashboard, exposed):
    used = {m for expr in _walk(dashboard, "expr") for m in METRIC.findall(expr)}
    assert set(exposed) - used == set()


def test_datasource_is_the_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
    for target in _targets(dashboard):
        assert target["datasource"] == DATASOURCE


def test_the_promised_panels_exist(dashboard):
    exprs = [t["expr"] for t in _targets(dashboard)]
    fidelity = [
        e
        for e in exprs
        if re.search(r"rate\(tcpcopy_client_bytes_acked_total\b", e)
        and re.search(r"/\s*sum\(rate\(tcpcopy_client_bytes_captured_total\b", e)
        and e.startswith("100 *")
    ]
    assert fidelity, "replay fidelity %"
    assert any("by (reason)" in e and "tcpcopy_packets_dropped_total" in e for e in exprs)
    assert any("by (worker)" in e and "tcpcopy_unsend_packets" in e for e in exprs)
    assert any("by (worker)" in e and "tcpcopy_ring_dropped_total" in e for e in exprs)
    assert any("intercept_queue_dropped_total" in e for e in exprs)
    assert any("by (outcome)" in e and "tcpcopy_sessions_total" in e for e in exprs)
    assert any("intercept_responses_unrouted_total" in e for e in exprs)
    assert any("tcpcopy_rss_bytes" in e for e in exprs)


def test_layout_ids_unique_and_panels_do_not_overlap(dashboard):
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    for target in _targets(dashboard):
        assert target["refId"] and target["expr"].count("(") == target["expr"].count(")")
