"""prometheus/grafana: the SoftFactory dashboard.

No Grafana server here, so the dashboard is checked in layers: JSON structure and the
seed's panels, dashboard-linter style rules on every query, PromQL syntax with promtool,
and (with the demo) that every panel query returns data from a real Prometheus scraping
the SoftFactory demo under gunicorn.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from opsutil import (
    DASHBOARD,
    JOB,
    PROM_DIR,
    RULES_DIR,
    dashboard_targets,
    load_yaml,
    need_demo,
    prometheus_config,
    running_demo,
    running_prometheus,
    send_traffic,
    substitute,
    write_yaml,
)
from support import need_binary

PROVISIONING = PROM_DIR / "grafana" / "provisioning"
DS = {"type": "prometheus", "uid": "${datasource}"}
FILTER = 'job=~"$job", instance=~"$instance"'


def dashboard() -> dict[str, Any]:
    with open(DASHBOARD, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def all_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression: panel targets and annotations."""
    found = [(f"{title}/{ref}", expr) for title, ref, expr in dashboard_targets()]
    for ann in dashboard()["annotations"]["list"]:
        if "expr" in ann:
            found.append((f"annotation {ann['name']}", ann["expr"]))
    return found


# --------------------------------------------------------------------- structure


def test_dashboard_is_valid_json_for_provisioning() -> None:
    doc = dashboard()
    assert doc["uid"] == "softfactory-main"
    assert doc["id"] is None
    assert doc["schemaVersion"] >= 36
    text = DASHBOARD.read_text()
    # The "export for sharing" format breaks file provisioning.
    assert "__inputs" not in doc and "${DS_" not in text
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, p["title"]


def test_datasource_variable_is_used_by_every_panel_and_query() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DS
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"
    for p in panels():
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, (p["title"], t["refId"])
    for ann in dashboard()["annotations"]["list"]:
        if "expr" in ann:
            assert ann["datasource"] == DS


def _panel(type_: str, title_part: str) -> dict[str, Any]:
    found = [p for p in panels() if p["type"] == type_ and title_part in p["title"]]
    assert len(found) == 1, (type_, title_part, [p["title"] for p in panels()])
    return found[0]


def _exprs(panel: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for t in panel["targets"])


def test_the_seed_panels_are_there() -> None:
    health = _exprs(_panel("stat", "System health"))
    assert "min(up{" in health and "softfactory_up" in health
    assert "softfactory_database_status" in health and "timestamp(up{" in health

    traffic = _exprs(_panel("timeseries", "Request rate & errors"))
    assert "rate(softfactory_requests_total{" in traffic
    assert "rate(softfactory_errors_total{" in traffic

    latency = _panel("timeseries", "P50 / P95 / P99")
    assert [t["legendFormat"] for t in latency["targets"]] == ["P50", "P95", "P99"]
    for q, t in zip(("0.50", "0.95", "0.99"), latency["targets"], strict=True):
        assert t["expr"].startswith(f"histogram_quantile({q}, sum by (le) (rate(")
    assert latency["fieldConfig"]["defaults"]["unit"] == "ms"

    gauges = _panel("gauge", "CPU & memory")
    assert "softfactory_cpu_percent" in _exprs(gauges)
    assert "softfactory_memory_percent" in _exprs(gauges)

    db = _exprs(_panel("stat", "Database stats"))
    for table in ("users", "bookings", "payments"):
        assert f"softfactory_database_{table}{{" in db

    pie = _panel("piechart", "Error distribution")
    assert "sum by (status)" in _exprs(pie)

    table = _panel("table", "Endpoint performance")
    assert all(t["format"] == "table" and t["instant"] for t in table["targets"])
    renamed = table["transformations"][1]["options"]["renameByName"]
    assert set(renamed.values()) == {"Endpoint", "Method", "Avg latency", "P95", "% Errors", "RPS"}
    assert table["options"]["sortBy"] == [{"displayName": "P95", "desc": True}]

    heatmap = _panel("heatmap", "Daily uptime")
    assert heatmap["timeFrom"] == "30d" and heatmap["interval"] == "1h"
    assert "avg_over_time(up{" in _exprs(heatmap)

    availability = _panel("stat", "30-day availability")
    assert "[30d]" in _exprs(availability)
    assert "job:softfactory_request_errors:ratio_rate1h" in _exprs(availability)


def test_thresholds_match_the_alert_rules() -> None:
    groups = load_yaml(RULES_DIR / "alerts.yml")["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}

    def steps(panel: dict[str, Any]) -> set[float]:
        return {
            s["value"]
            for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            if s["value"] is not None
        }

    gauges = steps(_panel("gauge", "CPU & memory"))
    assert "> 80" in alerts["HighCPUUsage"]["expr"] and "> 80" in alerts["HighMemoryUsage"]["expr"]
    assert "> 95" in alerts["CriticalMemoryUsage"]["expr"]
    assert gauges == {80, 95}
    assert "> 1000" in alerts["SlowResponseTime"]["expr"]
    assert steps(_panel("timeseries", "P50 / P95 / P99")) == {1000}


# --------------------------------------------------------------------- queries


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = need_binary("promtool")
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(all_exprs())
    ]
    path = write_yaml(
        tmp_path / "dashboard_queries.yml", {"groups": [{"name": "q", "rules": rules}]}
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_check_catches_a_broken_query(tmp_path: Path) -> None:
    promtool = need_binary("promtool")
    broken = {
        "record": "dashboard:query:check",
        "expr": "sum(rate(softfactory_requests_total[1m])",
    }
    path = write_yaml(tmp_path / "broken.yml", {"groups": [{"name": "q", "rules": [broken]}]})
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode != 0


SELECTOR_RE = re.compile(r"(?<![\w:])([a-z_][a-z0-9_]*)\{([^}]*)\}")
RANGE_RE = re.compile(r"\[([^\]]+)\]")


def test_queries_follow_the_dashboard_lint_rules() -> None:
    """The grafana/dashboard-linter rules that matter here, plus sfmon's own."""
    for where, expr in all_exprs():
        # Every raw selector filters on the job/instance variables; recording rules
        # (level:metric:ops) are already per job and filter on $job.
        for name, matchers in SELECTOR_RE.findall(expr):
            assert FILTER in matchers, (where, name)
        for rec in re.findall(r"\b(?:job|instance):[a-z0-9_]+:[a-z0-9_]+\{([^}]*)\}", expr):
            assert 'job=~"$job"' in rec, where
        bare = re.findall(r"(?<![\w:])((?:softfactory|sfmon)_[a-z0-9_]+|up)\b(?!\{)", expr)
        assert not bare, (where, bare)
        # Ranges come from Grafana ($__rate_interval, $__range, $__interval) or are the
        # fixed 30-day availability window.
        for rng in RANGE_RE.findall(expr):
            assert rng in {"$__rate_interval", "$__range", "$__interval", "30d"}, (where, rng)
        # rate() over a time series panel uses $__rate_interval.
        if "rate(" in expr and where.split("/")[0] in {
            p["title"] for p in panels() if p["type"] == "timeseries"
        }:
            assert "[$__range]" not in expr, where
        # Counters only inside rate()/increase().
        for counter in re.finditer(r"(?:softfactory|sfmon)_[a-z_]+_total\{", expr):
            before = expr[: counter.start()]
            assert before.endswith(("rate(", "increase(")), (where, counter.group())
        # Classic buckets only under histogram_quantile, aggregated by le.
        for m in re.finditer(r"_bucket\{", expr):
            head = expr[: m.start()]
            assert "histogram_quantile(" in head, where
            assert re.search(r"sum by \([^)]*\ble\b[^)]*\) \(rate\([a-z_]*$", head), where


def test_grafana_provisioning_files() -> None:
    ds = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    boards = load_yaml(PROVISIONING / "dashboards" / "softfactory.yml")
    (provider,) = boards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


# --------------------------------------------------------------------- against the demo


@pytest.mark.integration
def test_every_panel_returns_data_from_demo(tmp_path: Path) -> None:
    """A real Prometheus scrapes the demo under gunicorn; every panel query answers."""
    need_demo()
    need_binary("prometheus")
    with running_demo(tmp_path / "demo", workers=2) as demo:
        cfg = prometheus_config(
            targets=[demo.target], rule_files=[str(RULES_DIR / "recording.yml")]
        )
        with running_prometheus(tmp_path / "prom", cfg) as prom:
            prom.wait_for(f'up{{job="{JOB}"}} == 1', timeout=40)
            for _ in range(6):  # traffic across several 1 s scrapes, for rate()
                send_traffic(demo.url, rounds=2)
                time.sleep(1)
            failures = []
            for title, ref, expr in dashboard_targets():
                query = substitute(expr, rate="15s", range_="5m", interval="1h")
                deadline = time.monotonic() + 15
                result: list[dict[str, Any]] = []
                while time.monotonic() < deadline and not result:
                    result = prom.query(query)
                    if not result:
                        time.sleep(0.5)
                if not result:
                    failures.append(f"{title} / {ref}: no data for {query}")
            assert not failures, "\n".join(failures)
