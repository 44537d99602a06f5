"""prometheus/: scrape configs, alert and recording rules, promtool unit tests, runbooks.

promtool checks run the real Debian binary (skipped only when it is not installed); the
structural checks read the YAML. The scale-out and native-histogram tests run a real
Prometheus against the SoftFactory demo under gunicorn (skipped until the demo exists).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from opsutil import (
    JOB,
    METRICS_PATH,
    PROM_DIR,
    RULES_DIR,
    dashboard_targets,
    load_yaml,
    need_demo,
    prometheus_config,
    running_demo,
    running_prometheus,
    scaled_alert_rules,
    send_traffic,
    substitute,
    wait_until,
    write_yaml,
)
from support import ROOT, need_binary

CONFIGS = sorted(PROM_DIR.glob("prometheus*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks"
RUNBOOK_PREFIX = "https://github.com/softfactory/sfmon/blob/main/"
SEVERITIES = {"critical", "high", "warning", "info"}

# The seed's alert list (section 5) with its priority mapped to a severity label.
SEED_ALERTS = {
    "SoftFactoryDown": "critical",
    "CriticalMemoryUsage": "critical",
    "DatabaseUnhealthy": "critical",
    "HighErrorRate": "high",
    "SlowResponseTime": "high",
    "HighMemoryUsage": "high",
    "FailedPayments": "high",
    "FailedBackup": "high",
    "HighCPUUsage": "warning",
    "DatabaseSizeCritical": "warning",
    "ServiceRestart": "warning",
    "ConfigurationChanged": "warning",
    "NoActiveUsers": "info",
}

# Metric families the rules may use: the sfmon / demo contract and Prometheus' own.
CONTRACT_METRICS = {
    "softfactory_requests_total",
    "softfactory_errors_total",
    "softfactory_request_latency_ms",
    "softfactory_request_latency_ms_bucket",
    "softfactory_request_latency_ms_sum",
    "softfactory_request_latency_ms_count",
    "softfactory_requests_in_progress",
    "softfactory_exceptions_total",
    "softfactory_start_time_seconds",
    "softfactory_uptime_seconds",
    "softfactory_build_info",
    "softfactory_config_info",
    "softfactory_up",
    "softfactory_database_status",
    "softfactory_database_users",
    "softfactory_database_payments",
    "softfactory_database_bookings",
    "softfactory_database_sns_posts",
    "softfactory_database_campaigns",
    "softfactory_database_ai_employees",
    "softfactory_database_size_bytes",
    "softfactory_memory_rss_mb",
    "softfactory_memory_percent",
    "softfactory_cpu_percent",
    "softfactory_workers",
    "softfactory_workers_busy",
    "softfactory_log_disk_free_ratio",
    "softfactory_payments_failed_total",
    "softfactory_last_backup_timestamp_seconds",
    "softfactory_active_users",
    "sfmon_scrape_duration_seconds",
    "sfmon_store_files",
    "sfmon_store_corrupt_files_total",
    "sfmon_label_overflow_total",
    "sfmon_request_ids_rejected_total",
    "sfmon_log_write_failures_total",
    "up",
    "scrape_duration_seconds",
}
METRIC_RE = re.compile(
    r"(?<![\w:$])((?:softfactory|sfmon)_[a-z0-9_]+|up|scrape_duration_seconds)\b"
)
RECORDED_RE = re.compile(r"\b((?:job|instance):[a-z0-9_]+:[a-z0-9_]+)\b")


def promtool() -> str:
    return need_binary("promtool")


def run(args: list[str], cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(RULES_DIR / "alerts.yml")
    return [r for g in doc["groups"] for r in g["rules"]]


def recording_rules() -> list[dict[str, Any]]:
    doc = load_yaml(RULES_DIR / "recording.yml")
    return [r for g in doc["groups"] for r in g["rules"]]


def rule_groups() -> list[str]:
    names = []
    for path in (RULES_DIR / "recording.yml", RULES_DIR / "alerts.yml"):
        names += [g["name"] for g in load_yaml(path)["groups"]]
    return names


# --------------------------------------------------------------------- promtool


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_promtool_check_config(config: Path) -> None:
    result = run([promtool(), "check", "config", config.name])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_promtool_check_rules_clean_with_all_lints() -> None:
    files = ["rules/recording.yml", "rules/alerts.yml"]
    result = run([promtool(), "check", "rules", "--lint=all", "--lint-fatal", *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lint" not in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize("test_file", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = run([promtool(), "test", "rules", str(test_file.relative_to(PROM_DIR))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


MUTATIONS = [
    ("SoftFactoryDown", 'up{job="softfactory-api"} == 0', 'up{job="softfactory-api"} == 2'),
    (
        "CriticalMemoryUsage",
        "(softfactory_memory_percent) > 95",
        "(softfactory_memory_percent) > 99",
    ),
    ("FailedBackup", "> 86400", "> 186400"),
    ("SoftFactoryErrorBudgetBurn", "(14.4 * 0.001)", "(24.4 * 0.001)"),
]


@pytest.mark.parametrize(("alert", "old", "new"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_promtool_unit_tests_catch_a_broken_rule(
    tmp_path: Path, alert: str, old: str, new: str
) -> None:
    """The unit tests are not vacuous: weakening a rule makes them fail."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROM_DIR / "rules", copy / "rules")
    shutil.copytree(PROM_DIR / "tests", copy / "tests")
    alerts = copy / "rules" / "alerts.yml"
    text = alerts.read_text()
    assert old in text, old
    alerts.write_text(text.replace(old, new))
    files = [
        str(p.relative_to(copy))
        for p in sorted((copy / "tests").glob("*.yml"))
        if f"alertname: {alert}\n" in p.read_text()
    ]
    assert files
    result = run([promtool(), "test", "rules", *files], cwd=copy)
    assert result.returncode != 0
    assert f"alertname: {alert}," in result.stdout + result.stderr


# --------------------------------------------------------------------- scrape configs


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_scrape_config_follows_the_contract(config: Path) -> None:
    cfg = load_yaml(config)
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["metrics_path"] == METRICS_PATH
    assert job["scrape_interval"] == "15s"
    assert cfg["global"]["scrape_timeout"] == "10s"  # SfmonScrapeSlow fires at 8 s
    assert cfg["rule_files"] == ["rules/recording.yml", "rules/alerts.yml"]
    assert cfg["alerting"]["alertmanagers"]


def test_file_sd_variant_finds_three_loopback_instances() -> None:
    cfg = load_yaml(PROM_DIR / "prometheus-file-sd.yml")
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == JOB)
    patterns = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    files = sorted({p for pat in patterns for p in PROM_DIR.glob(pat)})
    assert files, patterns
    targets = []
    for path in files:  # promtool 2.42 does not open file_sd files: check their shape
        groups = load_yaml(path)
        assert isinstance(groups, list)
        for group in groups:
            assert set(group) <= {"targets", "labels"}
            targets += group["targets"]
    hosts = sorted(t.rsplit(":", 1)[0] for t in targets)
    assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def test_native_variant_differs_only_in_comments() -> None:
    """The native variant needs the feature flag, not other config (2.42 has no knob)."""
    classic = load_yaml(PROM_DIR / "prometheus.yml")
    native = load_yaml(PROM_DIR / "prometheus-native.yml")
    for cfg in (classic, native):
        for job in cfg["scrape_configs"]:
            job.pop("authorization", None)
    assert classic == native
    text = (PROM_DIR / "prometheus-native.yml").read_text()
    assert "--enable-feature=native-histograms" in text


# --------------------------------------------------------------------- rule structure


def test_at_least_15_alerts_including_the_seed_list() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules if "alert" in r}
    assert len(names) >= 15, sorted(names)
    assert "LogDiskSpaceLow" in names
    for name, severity in SEED_ALERTS.items():
        severities = {r["labels"]["severity"] for r in rules if r.get("alert") == name}
        assert severities == {severity}, (name, severities)


def test_special_alerts_are_present() -> None:
    rules = [r for r in alert_rules() if "alert" in r]
    down = [r["expr"].strip() for r in rules if r["alert"] == "SoftFactoryDown"]
    assert 'up{job="softfactory-api"} == 0' in down
    assert 'absent(up{job="softfactory-api"})' in down
    burn = {
        r["labels"]["severity"]: r["expr"]
        for r in rules
        if r["alert"] == "SoftFactoryErrorBudgetBurn"
    }
    assert set(burn) == {"critical", "warning"}  # page and ticket
    for window in ("5m", "30m", "1h", "6h"):
        assert f"ratio_rate{window} " in burn["critical"]
    for window in ("2h", "6h", "1d", "3d"):
        assert f"ratio_rate{window} " in burn["warning"]
    exprs = " ".join(r["expr"] for r in rules)
    assert "softfactory_workers_busy" in " ".join(r["expr"] for r in recording_rules())
    for metric in ("sfmon_store_corrupt_files_total", "sfmon_label_overflow_total"):
        assert metric in exprs
    assert "scrape_duration_seconds" in exprs


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in alert_rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z]+", name), name
        assert "for" in rule and re.fullmatch(r"\d+[smhd]", rule["for"]), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        for label, value in rule["labels"].items():
            assert "$value" not in str(value), f"{name}: $value in label {label}"
        ann = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key), f"{name} lacks {key}"
        assert ann["runbook_url"] == f"{RUNBOOK_PREFIX}docs/runbooks/{name}.md"


def test_runbook_urls_map_to_existing_files() -> None:
    for rule in alert_rules():
        if "alert" in rule:
            url = rule["annotations"]["runbook_url"]
            assert url.startswith(RUNBOOK_PREFIX), url
            path = ROOT / url.removeprefix(RUNBOOK_PREFIX)
            assert path.is_file(), f"{rule['alert']}: {path.relative_to(ROOT)} is missing"


def test_every_runbook_belongs_to_an_alert_and_follows_the_seed_style() -> None:
    names = {r["alert"] for r in alert_rules() if "alert" in r}
    books = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert books == names
    index = (RUNBOOKS / "README.md").read_text()
    for name in names:
        text = (RUNBOOKS / f"{name}.md").read_text()
        assert text.startswith(f"# Alert: `{name}`"), name
        for section in ("**Symptoms:**", "**Root Causes:**", "**Response Steps:**"):
            assert section in text, (name, section)
        assert "**Escalation:**" in text, name
        assert "```bash" in text, name
        assert f"({name}.md)" in index, name


def test_group_names_are_unique() -> None:
    names = rule_groups()
    assert len(names) == len(set(names))


def test_recording_rules_follow_the_naming_convention() -> None:
    for rule in recording_rules():
        assert re.fullmatch(r"(job|instance):[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule


def test_rules_use_only_contract_metrics_and_defined_recordings() -> None:
    defined = {r["record"] for r in recording_rules()}
    used_recordings: set[str] = set()
    for rule in alert_rules() + recording_rules():
        expr = rule["expr"]
        used_recordings |= set(RECORDED_RE.findall(expr))
        without_recordings = RECORDED_RE.sub("", expr)
        for metric in METRIC_RE.findall(without_recordings):
            assert metric in CONTRACT_METRICS, f"{metric} is not a contract metric"
    assert used_recordings <= defined, used_recordings - defined


# --------------------------------------------------------------------- test coverage


def _test_cases() -> list[dict[str, Any]]:
    cases = []
    for path in TEST_FILES:
        doc = load_yaml(path)
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                cases.append(case)
    return cases


def test_test_files_load_every_rule_file_in_a_fixed_group_order() -> None:
    groups = rule_groups()
    for path in TEST_FILES:
        doc = load_yaml(path)
        files = {(path.parent / f).resolve() for f in doc["rule_files"]}
        assert files == {
            (RULES_DIR / "recording.yml").resolve(),
            (RULES_DIR / "alerts.yml").resolve(),
        }
        # Without group_eval_order, promtool evaluates groups in a random order.
        assert doc["group_eval_order"] == groups, path.name


def test_every_alert_rule_has_a_firing_and_a_quiet_test_case() -> None:
    cases = _test_cases()
    missing = []
    for rule in alert_rules():
        if "alert" not in rule:
            continue
        name, static = rule["alert"], rule["labels"]
        same_name = [c for c in cases if c["alertname"] == name]
        firing = [
            a
            for c in same_name
            for a in c.get("exp_alerts") or []
            if all(a["exp_labels"].get(k) == v for k, v in static.items())
        ]
        quiet = [c for c in same_name if not c.get("exp_alerts")]
        if not firing:
            missing.append(f"{name} {static}: no firing case")
        if not quiet:
            missing.append(f"{name}: no case where it does not fire")
        for alert in firing:
            assert alert["exp_annotations"]["runbook_url"] == rule["annotations"]["runbook_url"]
    assert not missing, missing


# --------------------------------------------------------------------- against the demo


@pytest.mark.integration
def test_scale_out_three_instances_through_file_sd(tmp_path: Path) -> None:
    """Three demo instances on 127.0.0.1-3, found through file_sd: per-instance `up` and
    alerts, and aggregated request rates."""
    need_demo()
    need_binary("prometheus")
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    rules = write_yaml(
        tmp_path / "alerts.yml", scaled_alert_rules({"SoftFactoryDown"}, "1s", scope="instance")
    )
    with (
        running_demo(tmp_path / "d1", host=hosts[0], workers=1) as d1,
        running_demo(tmp_path / "d2", host=hosts[1], workers=1) as d2,
        running_demo(tmp_path / "d3", host=hosts[2], workers=1) as d3,
    ):
        demos = [d1, d2, d3]
        sd_file = write_yaml(
            tmp_path / "targets.yml",
            [{"targets": [d.target for d in demos], "labels": {"env": "test"}}],
        )
        cfg = prometheus_config(
            PROM_DIR / "prometheus-file-sd.yml",
            file_sd=[str(sd_file)],
            rule_files=[str(RULES_DIR / "recording.yml"), str(rules)],
        )
        with running_prometheus(tmp_path / "prom", cfg) as prom:
            up = prom.wait_for(f'count(up{{job="{JOB}"}} == 1) == 3', timeout=40)
            assert up
            per_instance = {s["metric"]["instance"] for s in prom.query(f'up{{job="{JOB}"}}')}
            assert per_instance == {d.target for d in demos}
            per_instance_rate = (
                f'sum by (instance) (rate(softfactory_requests_total{{job="{JOB}"}}[15s])) > 0'
            )

            def traffic_seen() -> bool:
                # Waves across several scrapes: a counter born with its first request
                # needs a later, higher sample before rate() is above 0.
                for demo in demos:
                    send_traffic(demo.url, rounds=1)
                return len(prom.query(per_instance_rate)) == 3

            wait_until(traffic_seen, 30, "request rates from all three instances", step=1.0)
            total = prom.query(f'sum(rate(softfactory_requests_total{{job="{JOB}"}}[15s]))')
            assert len(total) == 1 and float(total[0]["value"][1]) > 0
            prom.wait_for("job:softfactory_requests:rate5m > 0")
            wait_until(
                lambda: len(prom.query("instance:softfactory_requests:rate5m > 0")) == 3,
                10,
                "the per-instance recording rule for all three",
            )

            # The dashboard with $instance = All: every panel answers, and the
            # aggregated request rate is one series over the three instances.
            for title, ref, expr in dashboard_targets():
                query = substitute(expr, rate="15s", range_="5m")
                result = wait_until(lambda q=query: prom.query(q), 15, f"{title}/{ref}: {query}")
                if title == "Request rate & errors" and ref == "A":
                    assert len(result) == 1 and float(result[0]["value"][1]) > 0

            d2.proc.stop(signal.SIGKILL)  # one instance dies: its own alert only

            def down_alerts() -> list[str]:
                return [
                    a["labels"]["instance"]
                    for a in prom.alerts()
                    if a["labels"]["alertname"] == "SoftFactoryDown" and a["state"] == "firing"
                ]

            assert wait_until(down_alerts, 30, "SoftFactoryDown for the killed instance") == [
                d2.target
            ]
            assert len(prom.query(f'up{{job="{JOB}"}} == 1')) == 2


@pytest.mark.integration
def test_native_histogram_variant_against_demo(tmp_path: Path) -> None:
    """prometheus-native.yml with --enable-feature=native-histograms ingests the latency
    histogram as native buckets, and the latency recording rules still answer."""
    need_demo()
    need_binary("prometheus")
    with running_demo(tmp_path / "demo") as demo:
        cfg = prometheus_config(
            PROM_DIR / "prometheus-native.yml",
            targets=[demo.target],
            rule_files=[str(RULES_DIR / "recording.yml")],
        )
        with running_prometheus(
            tmp_path / "prom", cfg, extra_args=("--enable-feature=native-histograms",)
        ) as prom:
            prom.wait_for(f'up{{job="{JOB}"}} == 1')
            for _ in range(3):
                send_traffic(demo.url, rounds=3)
                time.sleep(1)
            prom.wait_for("histogram_count(sum(rate(softfactory_request_latency_ms[1m]))) > 0")
            prom.wait_for("job:softfactory_request_latency_ms:p95_rate5m >= 0")
