"""Metric names and label names used by the observability assets, and the ones a /metrics page
exports; the comparison the deployment tests make.

    exported(text)             series name -> label names seen (None: a family with no sample yet)
    asset_expressions()        (where, PromQL) for every query of the dashboard, alerts and adapter rules
    selectors(expr)            (metric name, label names matched) of each vector selector (promql-parser)
    unknown_names(exprs, exp)  problems: names not exported, labels a series does not carry
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Exported by something other than pagedserve, each for a stated reason.
EXTERNAL = {
    "up": "Prometheus' own scrape-health series",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA DCGM exporter (GPU utilization, with pod mapping)",
}
# Labels Prometheus adds to every scraped series (target labels; the ServiceMonitor's relabelings).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container", "component"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}  # fmt: skip


def exported(text: str) -> dict[str, set[str] | None]:
    out: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = out.get(sample.name) or set()
            out[sample.name] = labels | set(sample.labels)
    return out


def _grafana_to_promql(expr: str) -> str:
    """Grafana's interval variables are not PromQL; other $variables only occur inside strings."""
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")


def asset_expressions() -> list[tuple[str, str]]:
    exprs: list[tuple[str, str]] = []
    dash = json.loads((DEPLOY / "grafana" / "pagedserve-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append((f"dashboard panel {panel['title']!r}", _grafana_to_promql(target["expr"])))
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query["query"])
            assert m, f"dashboard variable {var['name']}: unexpected query {query['query']!r}"
            exprs.append((f"dashboard variable {var['name']!r}", m.group(1)))
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            exprs.append((f"alert {rule['alert']}", rule["expr"]))
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter-values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        exprs.append(("adapter seriesQuery", rule["seriesQuery"]))
        series = rule["seriesQuery"].split("{")[0]
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="pagedserve",pod=~"p.*"').replace("<<.GroupBy>>", "pod"))  # fmt: skip
        exprs.append(("adapter metricsQuery", query))
    return exprs


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    tree = promql_parser.parse(expr)  # raises on a syntax error
    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), "")
            found.append((name, labels - {"__name__"}))

    promql_parser.walk(tree, visit)
    return found


def unknown_names(exprs: list[tuple[str, str]], exported_series: dict[str, set[str] | None]) -> list[str]:
    problems: list[str] = []
    for where, expr in exprs:
        try:
            found = selectors(expr)
        except Exception as e:  # promql-parser raises its own error types
            problems.append(f"{where}: not valid PromQL: {e}")
            continue
        if not found:
            problems.append(f"{where}: selects no metric")
        for name, labels in found:
            if name in EXTERNAL:
                continue
            if name not in exported_series:
                problems.append(f"{where}: {name} is not exported")
                continue
            carried = exported_series[name]
            if carried is not None:
                extra = labels - carried - TARGET_LABELS
                if extra:
                    problems.append(f"{where}: {name} has no label(s) {sorted(extra)} (it has {sorted(carried)})")
    return problems
