"""prometheus/alertmanager.yml: config check, routing per severity, inhibition, templates,
secrets through files, and the end-to-end path demo -> Prometheus -> Alertmanager ->
webhook with real processes on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from opsutil import (
    JOB,
    PROM_DIR,
    WebhookSink,
    alert_rules,
    alertmanager_binary,
    alertmanager_test_config,
    load_yaml,
    prometheus_config,
    running_alertmanager,
    running_demo,
    running_prometheus,
    scaled_alert_rules,
    wait_until,
    write_yaml,
)
from support import ROOT, need_binary

CONFIG = PROM_DIR / "alertmanager.yml"
SECRETS_DIR = "/etc/alertmanager/secrets/"

# severity -> receivers, as promised in alerts.yml and the seed (section 6).
EXPECTED_RECEIVERS = {
    "critical": "pagerduty-critical,slack-high",
    "high": "slack-high",
    "warning": "default-email",
    "info": "default-email",
}


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = need_binary("amtool")
    return subprocess.run(
        [binary, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60
    )


def routes_test(receivers: str, labels: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return amtool(
        "config",
        "routes",
        "test",
        "--config.file=alertmanager.yml",
        f"--verify.receivers={receivers}",
        *(f"{k}={v}" for k, v in labels.items()),
    )


# --------------------------------------------------------------------- amtool


def test_amtool_check_config() -> None:
    result = amtool("check-config", "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert " - 1 templates" in result.stdout


@pytest.mark.parametrize(("severity", "receivers"), sorted(EXPECTED_RECEIVERS.items()))
def test_routes_by_severity(severity: str, receivers: str) -> None:
    result = routes_test(receivers, {"alertname": "SomeAlert", "severity": severity})
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_severity_and_watchdog_routes() -> None:
    result = routes_test("default-email", {"alertname": "SomeAlert", "severity": "bogus"})
    assert result.returncode == 0, result.stdout + result.stderr
    result = routes_test("heartbeat", {"alertname": "Watchdog", "severity": "info"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_verify_receivers_really_verifies() -> None:
    """Without --verify.receivers amtool always exits 0; with it a mismatch fails."""
    result = routes_test("pagerduty-critical", {"alertname": "X", "severity": "high"})
    assert result.returncode != 0


def test_every_alert_rule_routes_to_the_receiver_of_its_severity() -> None:
    for rule in alert_rules():
        labels = {"alertname": rule["alert"], **rule["labels"]}
        expected = "heartbeat" if rule["alert"] == "Watchdog" else None
        expected = expected or EXPECTED_RECEIVERS[rule["labels"]["severity"]]
        result = routes_test(expected, labels)
        assert result.returncode == 0, (rule["alert"], result.stdout + result.stderr)


def test_templates_render() -> None:
    text = (
        '{{ template "softfactory.title" . }}|{{ template "softfactory.text" . }}'
        '|{{ template "softfactory.pagerduty.description" . }}'
    )
    glob = "--template.glob=templates/*.tmpl"
    result = amtool("template", "render", glob, f"--template.text={text}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SoftFactory" in result.stdout and "Started:" in result.stdout
    broken = amtool("template", "render", glob, '--template.text={{ template "nope" . }}')
    assert broken.returncode != 0


# --------------------------------------------------------------------- structure


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    items = []
    if isinstance(node, dict):
        for k, v in node.items():
            items.append((f"{path}.{k}", v))
            items += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            items += _walk(v, f"{path}[{i}]")
    return items


def test_secrets_come_from_files_only() -> None:
    cfg = load_yaml(CONFIG)
    inline = {
        "service_key",
        "routing_key",
        "api_url",
        "slack_api_url",
        "auth_password",
        "smtp_auth_password",
        "password",
        "credentials",
        "bearer_token",
        "auth_secret",
    }
    files = []
    for path, value in _walk(cfg):
        key = path.rsplit(".", 1)[-1]
        assert key not in inline, f"inline secret at {path}"
        if key.endswith("_file"):
            files.append(value)
    receivers = {r["name"]: r for r in cfg["receivers"]}
    assert receivers["pagerduty-critical"]["pagerduty_configs"][0]["routing_key_file"]
    assert receivers["slack-high"]["slack_configs"][0]["api_url_file"]
    assert cfg["global"]["smtp_auth_password_file"]
    readme = (PROM_DIR / "secrets" / "README.md").read_text()
    for f in files:
        assert f.startswith(SECRETS_DIR), f
        assert f"`{f.removeprefix(SECRETS_DIR)}`" in readme, f


def test_critical_inhibits_lower_severities_of_the_same_alert_and_instance() -> None:
    rules = load_yaml(CONFIG)["inhibit_rules"]
    generic = [r for r in rules if r["source_matchers"] == ['severity="critical"']]
    assert len(generic) == 1
    assert generic[0]["target_matchers"] == ['severity=~"high|warning"']
    assert set(generic[0]["equal"]) == {"alertname", "instance"}
    pairs = {(r["source_matchers"][0], r["target_matchers"][0]) for r in rules}
    assert ('alertname="CriticalMemoryUsage"', 'alertname="HighMemoryUsage"') in pairs


def _alert(name: str, severity: str, instance: str = "127.0.0.1:8000", **labels: str) -> dict:
    return {
        "labels": {"alertname": name, "severity": severity, "job": JOB, "instance": instance}
        | labels,
        "annotations": {"summary": name},
    }


@pytest.mark.integration
def test_inhibition_and_routing_in_a_real_alertmanager(tmp_path: Path) -> None:
    """Post alerts to a real Alertmanager (shipped routes and inhibit rules, receivers
    replaced by a local webhook): critical mutes the same alert's warning on the same
    instance only, and each severity reaches its receiver."""
    alertmanager_binary()
    with (
        WebhookSink() as sink,
        running_alertmanager(tmp_path / "am", alertmanager_test_config(sink.url)) as am,
    ):
        # The inhibiting (critical) alerts go first: posted in one batch, Alertmanager may
        # notify a target before it has evaluated its inhibitor.
        am.post_alerts(
            [
                _alert("SoftFactoryErrorBudgetBurn", "critical", instance=""),
                _alert("CriticalMemoryUsage", "critical"),
            ]
        )
        wait_until(lambda: len(am.alerts()) == 2, 10, "the critical alerts in Alertmanager")
        am.post_alerts(
            [
                _alert("SoftFactoryErrorBudgetBurn", "warning", instance=""),
                _alert("HighMemoryUsage", "high"),
                _alert("HighMemoryUsage", "high", instance="127.0.0.2:8000"),
                _alert("HighCPUUsage", "warning"),
                _alert("NoActiveUsers", "info", instance=""),
            ]
        )

        def states() -> dict[tuple[str, str, str], str]:
            return {
                (
                    a["labels"]["alertname"],
                    a["labels"]["severity"],
                    a["labels"].get("instance", ""),
                ): a["status"]["state"]
                for a in am.alerts()
            }

        wait_until(lambda: len(states()) == 7, 10, "7 alerts in Alertmanager")
        expected = {
            ("SoftFactoryErrorBudgetBurn", "warning", ""): "suppressed",
            ("HighMemoryUsage", "high", "127.0.0.1:8000"): "suppressed",
            ("HighMemoryUsage", "high", "127.0.0.2:8000"): "active",
            ("SoftFactoryErrorBudgetBurn", "critical", ""): "active",
            ("CriticalMemoryUsage", "critical", "127.0.0.1:8000"): "active",
            ("HighCPUUsage", "warning", "127.0.0.1:8000"): "active",
            ("NoActiveUsers", "info", ""): "active",
        }
        wait_until(lambda: states() == expected, 10, f"inhibition {expected}")

        def receivers_of(name: str) -> set[str]:
            return {path.lstrip("/") for _, path, _ in sink.firing(name)}

        wanted = {
            "CriticalMemoryUsage": {"pagerduty-critical", "slack-high"},
            "HighMemoryUsage": {"slack-high"},
            "HighCPUUsage": {"default-email"},
            "NoActiveUsers": {"default-email"},
        }
        wait_until(
            lambda: all(receivers_of(n) == r for n, r in wanted.items()),
            15,
            f"notifications {wanted}",
        )
        muted = [a for _, _, a in sink.firing("HighMemoryUsage")]
        assert {a["labels"]["instance"] for a in muted} == {"127.0.0.2:8000"}
        burn = [a for _, _, a in sink.firing("SoftFactoryErrorBudgetBurn")]
        assert {a["labels"]["severity"] for a in burn} == {"critical"}


# --------------------------------------------------------------------- end to end


@pytest.mark.integration
def test_softfactory_down_reaches_webhook(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    """Kill the demo (by PID) -> SoftFactoryDown (for: 1s) -> Alertmanager -> webhook.

    Real Prometheus and Alertmanager on 127.0.0.1; the rule is the shipped one with a
    test-scaled `for`, the routing is the shipped one with the receivers pointed at a
    local webhook. Prints the seconds from the kill to the notification.
    """
    need_binary("prometheus")
    alertmanager_binary()
    rules = write_yaml(
        tmp_path / "alerts.yml", scaled_alert_rules({"SoftFactoryDown"}, "1s", scope="instance")
    )
    with (
        WebhookSink() as sink,
        running_alertmanager(tmp_path / "am", alertmanager_test_config(sink.url)) as am,
        running_demo(tmp_path / "demo", workers=2) as demo,
    ):
        cfg = prometheus_config(
            targets=[demo.target],
            rule_files=[str(rules)],
            alertmanager=am.url.removeprefix("http://"),
        )
        with running_prometheus(tmp_path / "prom", cfg) as prom:
            # A steady state first: up for 3 s and no SoftFactoryDown anywhere (a slow
            # first scrape of a loaded machine must not count as the kill).
            prom.wait_for(f'min_over_time(up{{job="{JOB}"}}[3s]) == 1', timeout=40)
            wait_until(
                lambda: (
                    not prom.query('ALERTS{alertname="SoftFactoryDown"}')
                    and not [
                        a for a in am.alerts() if a["labels"]["alertname"] == "SoftFactoryDown"
                    ]
                ),
                30,
                "no SoftFactoryDown before the kill",
            )

            killed = time.monotonic()
            demo.proc.stop(signal.SIGKILL)  # the whole gunicorn process group, by PID
            hits = wait_until(
                lambda: sink.firing("SoftFactoryDown", since=killed),
                60,
                "SoftFactoryDown at the webhook",
            )
            seconds = hits[0][0] - killed
            print(f"\nSoftFactoryDown reached the webhook {seconds:.2f} s after the kill")
            record_property("softfactory_down_delivery_seconds", round(seconds, 2))

            paths = {path for _, path, _ in hits}
            assert "/pagerduty-critical" in paths  # severity critical pages
            labels = hits[0][2]["labels"]
            assert labels["instance"] == demo.target
            assert labels["job"] == JOB and labels["severity"] == "critical"
            assert hits[0][2]["annotations"]["runbook_url"].endswith("SoftFactoryDown.md")
            assert (ROOT / "docs" / "runbooks" / "SoftFactoryDown.md").is_file()
            assert seconds < 60
