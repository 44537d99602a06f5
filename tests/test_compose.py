"""docker-compose.monitoring.yml (no Docker engine here: it must parse, every mounted
host file must exist, and the containers must see the files where the configs look for
them), and tests/health-check-tests.sh, the seed's smoke script (against a stand-in
server, and against the demo under gunicorn)."""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opsutil import load_yaml, need_demo, running_demo
from support import ROOT

COMPOSE = ROOT / "docker-compose.monitoring.yml"
SMOKE = ROOT / "tests" / "health-check-tests.sh"


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def mounts(service: str) -> list[tuple[str, str]]:
    """(source, container path) of every volume of *service*."""
    out = []
    for spec in compose()["services"][service].get("volumes", []):
        parts = spec.split(":")
        assert len(parts) in (2, 3), spec
        out.append((parts[0], parts[1]))
    return out


def host_path(container: str, service: str) -> Path | None:
    """The repository path that *service* sees at *container*, through a bind mount."""
    best = None
    for source, target in mounts(service):
        if not source.startswith("."):
            continue
        inside = container == target or container.startswith(target.rstrip("/") + "/")
        if inside and (best is None or len(target) > len(best[1])):
            best = (source, target)
    if best is None:
        return None
    rest = container[len(best[1]) :].lstrip("/")
    return (ROOT / best[0] / rest) if rest else ROOT / best[0]


# --------------------------------------------------------------------- compose


def test_compose_parses_and_has_the_seed_services() -> None:
    doc = compose()
    services = doc["services"]
    seed = {"prometheus", "alertmanager", "grafana", "elasticsearch", "kibana"}
    assert seed | {"softfactory", "logstash", "filebeat", "elk-setup"} == set(services)
    ports = {p.split(":")[0] for s in services.values() for p in s.get("ports", [])}
    assert ports == {"8000", "9090", "9093", "3000", "9200", "5601"}
    for name, svc in services.items():
        assert "image" in svc, name
        assert not svc["image"].endswith(":latest"), name


def test_every_mounted_host_file_exists_and_named_volumes_are_declared() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    used = set()
    for name in doc["services"]:
        for source, target in mounts(name):
            assert target.startswith("/"), (name, target)
            if source.startswith("."):
                path = ROOT / source
                assert path.exists(), f"{name}: {source} does not exist"
            else:
                used.add(source)
                assert source in declared, f"{name}: volume {source} is not declared"
    assert used == declared


def test_prometheus_sees_its_rule_files() -> None:
    config_host = host_path("/etc/prometheus/prometheus.yml", "prometheus")
    assert config_host == ROOT / "prometheus" / "prometheus-compose.yml"
    cfg = load_yaml(config_host)
    for rule_file in cfg["rule_files"]:
        seen = host_path(posixpath.join("/etc/prometheus", rule_file), "prometheus")
        assert seen is not None and seen.is_file(), rule_file
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "softfactory-api")
    (target,) = job["static_configs"][0]["targets"]
    assert target.split(":")[0] in compose()["services"]
    (am,) = cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am.split(":")[0] in compose()["services"]
    command = compose()["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command


def test_alertmanager_sees_its_templates_and_secrets_directory() -> None:
    config_host = host_path("/etc/alertmanager/alertmanager.yml", "alertmanager")
    assert config_host == ROOT / "prometheus" / "alertmanager.yml"
    cfg = load_yaml(config_host)
    for pattern in cfg["templates"]:
        directory = host_path(
            posixpath.join("/etc/alertmanager", posixpath.dirname(pattern)), "alertmanager"
        )
        assert directory is not None and list(directory.glob(posixpath.basename(pattern)))
    secret_files = [
        v
        for r in cfg["receivers"]
        for configs in r.values()
        if isinstance(configs, list)
        for c in configs
        for k, v in _flatten(c)
        if k.endswith("_file")
    ] + [cfg["global"]["smtp_auth_password_file"]]
    for f in secret_files:
        seen = host_path(posixpath.dirname(f), "alertmanager")
        assert seen is not None and seen.is_dir(), f  # the files themselves are not in git


def _flatten(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _flatten(v)


def test_grafana_loads_the_provisioned_dashboard() -> None:
    provisioning = host_path("/etc/grafana/provisioning", "grafana")
    assert provisioning == ROOT / "prometheus" / "grafana" / "provisioning"
    provider = load_yaml(provisioning / "dashboards" / "softfactory.yml")["providers"][0]
    directory = provider["options"]["path"]
    board = host_path(posixpath.join(directory, "softfactory-dashboard.json"), "grafana")
    assert board is not None and board.is_file()
    json.loads(board.read_text())
    source = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["url"].split("//")[1].split(":")[0] in compose()["services"]


def test_log_shippers_read_the_volume_the_app_writes() -> None:
    services = compose()["services"]

    def env(service: str) -> dict[str, str]:
        return dict(item.split("=", 1) for item in services[service]["environment"])

    app_dir = env("softfactory")["SFMON_LOG_DIR"]
    (app_volume,) = [s for s, t in mounts("softfactory") if t == app_dir]
    for shipper in ("logstash", "filebeat"):
        log_dir = env(shipper)["SOFTFACTORY_LOG_DIR"]
        assert (app_volume, log_dir) in mounts(shipper), shipper
    pipeline = host_path("/usr/share/logstash/pipeline/softfactory.conf", "logstash")
    assert pipeline is not None and pipeline.is_file()
    filebeat = host_path("/usr/share/filebeat/filebeat.yml", "filebeat")
    assert filebeat is not None and filebeat.is_file()
    setup = host_path("/elk/setup.sh", "elk-setup")
    assert setup is not None and setup.is_file()
    assert services["filebeat"]["profiles"] == ["filebeat"]  # not started with logstash


# --------------------------------------------------------------------- smoke script


GOOD: dict[str, tuple[int, dict[str, Any] | str]] = {
    "/api/metrics/live": (200, {"alive": True, "timestamp": "2026-02-25T10:30:45Z", "pid": 7}),
    "/api/metrics/health": (
        200,
        {
            "status": "healthy",
            "timestamp": "2026-02-25T10:30:45Z",
            "uptime_seconds": 3600,
            "database": "healthy",
            "api": "ok",
            "checks": {"database": {"ok": True}},
        },
    ),
    "/api/metrics/ready": (200, {"ready": True, "timestamp": "2026-02-25T10:30:45Z"}),
    "/api/metrics/summary": (
        200,
        {
            "timestamp": "2026-02-25T10:30:45Z",
            "uptime": {"seconds": 3600, "human_readable": "1h 0m 0s"},
            "system": {
                "cpu_percent": 15.2,
                "memory": {"rss_mb": 128.5, "vms_mb": 256.3, "percent": 25.6},
                "process_id": 7,
            },
            "application": {"requests_total": 15432, "errors_total": 42, "error_rate": 0.27},
            "database": {"status": "healthy", "stats": {"users": 256}},
        },
    ),
    "/api/metrics/errors": (
        200,
        {
            "timestamp": "2026-02-25T10:30:45Z",
            "requests_total": 15432,
            "errors_total": 42,
            "error_rate_percent": 0.27,
        },
    ),
    "/api/metrics/prometheus": (
        200,
        "".join(
            f"# HELP {m} x\n# TYPE {m} {t}\n{m}{s} 1\n"
            for m, t, s in [
                ("softfactory_up", "gauge", ""),
                ("softfactory_uptime_seconds", "gauge", ""),
                ("softfactory_requests_total", "counter", '{method="GET",path="/",status="200"}'),
                ("softfactory_request_latency_ms", "histogram", '_count{method="GET",path="/"}'),
                ("softfactory_memory_rss_mb", "gauge", ""),
                ("softfactory_cpu_percent", "gauge", ""),
                ("softfactory_database_status", "gauge", ""),
            ]
        ),
    ),
}


@contextmanager
def stand_in(responses: dict[str, tuple[int, dict[str, Any] | str]]) -> Iterator[str]:
    """A tiny server that answers like sfmon's endpoints."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = responses.get(self.path, (404, {"error": "not found"}))
            if isinstance(body, str):
                data, ctype = body.encode(), "text/plain; version=0.0.4; charset=utf-8"
            else:
                data, ctype = json.dumps(body).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("X-Request-Id", "a1b2c3d4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def smoke(base_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASE_URL": base_url}
    return subprocess.run(
        ["bash", str(SMOKE)], env=env, capture_output=True, text=True, timeout=120
    )


def test_smoke_script_syntax_and_mode() -> None:
    assert subprocess.run(["bash", "-n", str(SMOKE)]).returncode == 0
    assert os.access(SMOKE, os.X_OK)


def test_smoke_script_passes_on_a_healthy_server() -> None:
    with stand_in(GOOD) as url:
        result = smoke(url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All 24 checks passed." in result.stdout


@pytest.mark.parametrize(
    ("path", "status", "change", "message"),
    [
        ("/api/metrics/health", 503, {"status": "degraded", "database": "unhealthy"},
         "health: HTTP 503, expected 200"),
        ("/api/metrics/ready", 200, {"ready": False}, "ready is false, expected true"),
        ("/api/metrics/summary", 200, {"uptime": {"seconds": 1}},
         "missing key uptime.human_readable"),
        ("/api/metrics/live", 200, {"timestamp": "2026-02-25 10:30:45"}, "not UTC ISO 8601"),
    ],
)  # fmt: skip
def test_smoke_script_fails_on_a_broken_server(
    path: str, status: int, change: dict[str, Any], message: str
) -> None:
    broken = dict(GOOD)
    body = GOOD[path][1]
    assert isinstance(body, dict)
    broken[path] = (status, body | change)
    with stand_in(broken) as url:
        result = smoke(url)
    assert result.returncode == 1, result.stdout
    assert message in result.stdout


def test_smoke_script_exit_2_without_a_server() -> None:
    with stand_in({}) as url:
        pass  # closed again: nothing listens on that port now
    result = smoke(url)
    assert result.returncode == 2


@pytest.mark.integration
def test_smoke_script_against_demo(tmp_path: Path) -> None:
    need_demo()
    with running_demo(tmp_path / "demo", workers=2) as demo:
        result = smoke(demo.url)
    assert result.returncode == 0, result.stdout + result.stderr
