"""Check deploy/grafana/batchd-dashboard.json has what Grafana needs.

Structure: uid, title, schemaVersion, a datasource variable, and panels that
each carry id, type, gridPos and (except rows) targets with a PromQL expr.
Metrics: every ``batchd_*`` name in an expr is one DESIGN section 9 promises
(or the gauge deploy/ added beside it), and is defined in batchd/metrics.py
when that file exists.

Usage: python deploy/check_dashboard.py [--promql-rules OUT.yml] [DASHBOARD.json]
With --promql-rules it also writes every expr as a recording rule (Grafana's
interval variables replaced) so that `promtool check rules OUT.yml` parses them.
Standard library only; exits 1 with one line per problem.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
DASHBOARD = DEPLOY / "grafana" / "batchd-dashboard.json"

# DESIGN section 9, by type; the extra gauge is used by BatchdBatchNearExpiry,
# the callback series (README "Callbacks") by BatchdCallbackDeliveriesFailing.
CONTRACT: dict[str, str] = {
    "batchd_tasks_received": "counter",
    "batchd_tasks_completed": "counter",
    "batchd_queue_tasks": "gauge",
    "batchd_queue_oldest_task_created_timestamp_seconds": "gauge",
    "batchd_flushes": "counter",
    "batchd_batch_tasks": "histogram",
    "batchd_batch_input_bytes": "histogram",
    "batchd_batches_in_flight": "gauge",
    "batchd_batches_finished": "counter",
    "batchd_batch_turnaround_seconds": "histogram",
    "batchd_task_latency_seconds": "histogram",
    "batchd_provider_requests": "counter",
    "batchd_tokens": "counter",
    "batchd_spend_dollars": "counter",
    "batchd_savings_dollars": "counter",
    "batchd_budget_limit_dollars": "gauge",
    "batchd_budget_spent_dollars": "gauge",
    "batchd_poller_last_success_timestamp_seconds": "gauge",
    "batchd_config_window_seconds": "gauge",
    "batchd_config_max_batch_tasks": "gauge",
    "batchd_build": "info",
    "batchd_batch_oldest_in_flight_submitted_timestamp_seconds": "gauge",
    "batchd_callback_deliveries": "counter",
    "batchd_callback_delivery_seconds": "histogram",
    "batchd_callbacks_pending": "gauge",
    "batchd_callbacks_failed": "gauge",
    # DESIGN 15, a year of operation (README "Running it for a year").
    "batchd_database_size_bytes": "gauge",
    "batchd_rows_pruned": "counter",
    "batchd_retention_oldest_finished_timestamp_seconds": "gauge",
    "batchd_config_retention_days": "gauge",
}

# What prometheus-client exposes for each metric type.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "info": ("_info",),
}
# MoneyCounter: batchd.metrics' exact dollar counter, exposed as a counter.
_PROM_TYPES = {"Counter": "counter", "MoneyCounter": "counter", "Gauge": "gauge",
               "Histogram": "histogram", "Info": "info"}
_METRIC_RE = re.compile(r"\bbatchd_[A-Za-z0-9_:]*")
_PANEL_TYPES = {
    "row", "timeseries", "stat", "gauge", "bargauge", "table", "barchart", "piechart", "text",
}


def series_names(metrics: dict[str, str]) -> dict[str, str]:
    """Exposed series name -> metric base name."""
    return {
        base + suffix: base
        for base, kind in metrics.items()
        for suffix in _SUFFIXES[kind]
    }


def defined_metrics(path: Path = REPO / "batchd" / "metrics.py") -> dict[str, str] | None:
    """Base name -> type for every metric batchd/metrics.py defines (None if absent)."""
    if not path.exists():
        return None
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = node.args[0]
        if name in _PROM_TYPES and isinstance(first, ast.Constant) and isinstance(first.value, str):
            found[first.value] = _PROM_TYPES[name]
    return found


def check_expr_metrics(where: str, expr: str) -> list[str]:
    """Problems with the batchd_ series an expression reads."""
    allowed = series_names(CONTRACT)
    defined = defined_metrics()
    problems = []
    for name in sorted(set(_METRIC_RE.findall(expr))):
        base = allowed.get(name)
        if base is None:
            problems.append(f"{where}: {name} is not a DESIGN section 9 series")
        elif defined is not None and defined.get(base) != CONTRACT[base]:
            problems.append(
                f"{where}: {name} needs {CONTRACT[base]} {base} in batchd/metrics.py"
            )
    return problems


def _check_grid(title: str, grid: object) -> list[str]:
    if not isinstance(grid, dict) or not all(
        isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")
    ):
        return [f"panel {title!r}: gridPos needs integer h, w, x, y"]
    if grid["w"] < 1 or grid["x"] < 0 or grid["x"] + grid["w"] > 24:
        return [f"panel {title!r}: gridPos must fit the 24-column grid"]
    return []


def check_dashboard(dash: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    uid = dash.get("uid")
    if not isinstance(uid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
        problems.append("uid must be 1-40 characters of letters, digits, - or _")
    if not isinstance(dash.get("title"), str) or not dash["title"]:
        problems.append("title is missing")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        problems.append("schemaVersion must be an integer >= 36")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append("templating needs a 'datasource' variable of type datasource")

    panels = dash.get("panels")
    if not isinstance(panels, list) or not panels:
        return [*problems, "panels is missing or empty"]
    ids: set[int] = set()
    for panel in panels:
        title = panel.get("title", "?")
        pid = panel.get("id")
        if not isinstance(pid, int) or pid in ids:
            problems.append(f"panel {title!r}: id must be a unique integer")
        else:
            ids.add(pid)
        if panel.get("type") not in _PANEL_TYPES:
            problems.append(f"panel {title!r}: unknown type {panel.get('type')!r}")
        problems += _check_grid(title, panel.get("gridPos"))
        if panel.get("type") in ("row", "text"):
            continue
        targets = panel.get("targets")
        if not isinstance(targets, list) or not targets:
            problems.append(f"panel {title!r}: no targets")
            continue
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            problems.append(f"panel {title!r}: targets need distinct refIds")
        for target in targets:
            expr = target.get("expr")
            if not isinstance(expr, str) or ("batchd_" not in expr and "up{" not in expr):
                problems.append(f"panel {title!r}: target {target.get('refId')} has no expr")
                continue
            problems += check_expr_metrics(f"panel {title!r}", expr)
    return problems


_GRAFANA_VARS = re.compile(r"\$__(rate_interval|interval|range)")


def promql_rules(dash: dict[str, Any]) -> str:
    """A rules file with one recording rule per target expr (JSON is valid YAML)."""
    rules = [
        {"record": f"dashboard:panel_{panel['id']}_{target['refId']}",
         "expr": _GRAFANA_VARS.sub("5m", target["expr"])}
        for panel in dash["panels"]
        for target in panel.get("targets", [])
    ]
    return json.dumps({"groups": [{"name": "batchd-dashboard", "rules": rules}]}, indent=1)


def main(argv: list[str]) -> int:
    args = argv[1:]
    rules_out = None
    if args[:1] == ["--promql-rules"] and len(args) >= 2:
        rules_out, args = Path(args[1]), args[2:]
    path = Path(args[0]) if args else DASHBOARD
    try:
        dash = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"FAIL {path}: {exc}")
        return 1
    problems = check_dashboard(dash)
    for problem in problems:
        print(f"FAIL {path.name}: {problem}")
    if problems:
        return 1
    if rules_out is not None:
        rules_out.write_text(promql_rules(dash))
    print(f"OK {path.name}: {len(dash['panels'])} panels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
