"""Helpers for the operations-asset tests.

Real Prometheus and Alertmanager processes on free 127.0.0.1 ports with their own
temporary storage, a webhook receiver in a thread, and the SoftFactory demo under
gunicorn. Every process is started through :class:`support.Proc` and stopped by its PID
(its own process group), never by name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, Proc, free_port, gunicorn_bin, http_get, need_binary

PROM_DIR = ROOT / "prometheus"
RULES_DIR = PROM_DIR / "rules"
DEMO_DIR = ROOT / "examples" / "softfactory"
JOB = "softfactory-api"
METRICS_PATH = "/api/metrics/prometheus"
HOST = "127.0.0.1"


# --------------------------------------------------------------------- files


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_yaml(path: Path, data: Any) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of prometheus/rules/alerts.yml, in file order."""
    doc = load_yaml(RULES_DIR / "alerts.yml")
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def scaled_alert_rules(
    names: set[str], for_: str = "1s", scope: str | None = None
) -> dict[str, Any]:
    """The rules for *names* from alerts.yml, unchanged except ``for`` (test-scaled).

    *scope* keeps only the rules with that ``scope`` label (or without one).
    """
    rules = []
    for rule in alert_rules():
        if scope is not None and rule["labels"].get("scope", scope) != scope:
            continue
        if rule["alert"] in names:
            rule = copy.deepcopy(rule)
            rule["for"] = for_
            rules.append(rule)
    assert {r["alert"] for r in rules} == names, "unknown alert name"
    return {"groups": [{"name": "scaled-for-test", "rules": rules}]}


# --------------------------------------------------------------------- dashboard

DASHBOARD = PROM_DIR / "grafana" / "softfactory-dashboard.json"


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every query of every panel of the dashboard."""
    with open(DASHBOARD, encoding="utf-8") as f:
        doc = json.load(f)
    return [
        (p["title"], t["refId"], t["expr"])
        for p in doc["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def substitute(expr: str, *, rate: str = "1m", range_: str = "1h", interval: str = "1h") -> str:
    """Replace Grafana's macros and variables the way Grafana would ($instance = All)."""
    return (
        expr.replace("$__rate_interval", rate)
        .replace("$__range", range_)
        .replace("$__interval", interval)
        .replace('job=~"$job"', f'job=~"{JOB}"')
        .replace('instance=~"$instance"', 'instance=~".*"')
    )


# --------------------------------------------------------------------- waiting


def wait_until(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll *pred* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
        except (OSError, ValueError, KeyError) as exc:
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def get_json(url: str, timeout: float = 5.0) -> Any:
    status, _, body = http_get(url, timeout=timeout)
    if status != 200:
        raise ValueError(f"{url}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)


def wait_ready(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until *url* answers 200 (``/-/ready``); fail early if *proc* died."""

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"process exited early:\n{proc.output()[-4000:]}")
        try:
            return http_get(url, timeout=2)[0] == 200
        except OSError:
            return False

    wait_until(ready, timeout, f"{url} to answer 200")


# --------------------------------------------------------------------- Prometheus


class Prometheus:
    """A running Prometheus and a small client for its HTTP API."""

    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises ValueError on a bad expression (HTTP 400)."""
        qs = urllib.parse.urlencode({"query": expr})
        doc = get_json(f"{self.url}/api/v1/query?{qs}")
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until *expr* returns at least one series."""
        return wait_until(lambda: self.query(expr), timeout, f"PromQL {expr!r} to return data")

    def alerts(self) -> list[dict[str, Any]]:
        doc = get_json(f"{self.url}/api/v1/alerts")
        alerts: list[dict[str, Any]] = doc["data"]["alerts"]
        return alerts


def prometheus_config(
    base: Path = PROM_DIR / "prometheus.yml",
    *,
    targets: list[str] | None = None,
    file_sd: list[str] | None = None,
    rule_files: list[str] | None = None,
    alertmanager: str | None = None,
    interval: str = "1s",
) -> dict[str, Any]:
    """*base* (a shipped prometheus*.yml) with test-scaled intervals and the given targets.

    Keeps the softfactory-api job (metrics_path and all) and replaces its targets.
    """
    cfg = load_yaml(base)
    cfg["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    cfg["rule_files"] = list(rule_files or [])
    if alertmanager:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    else:
        cfg.pop("alerting", None)
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1
    job = jobs[0]
    job["scrape_interval"] = interval
    job.pop("static_configs", None)
    if file_sd is not None:
        job["file_sd_configs"] = [{"files": file_sd, "refresh_interval": "1s"}]
    else:
        job["static_configs"] = [{"targets": list(targets or [])}]
    cfg["scrape_configs"] = [job]
    return cfg


@contextmanager
def running_prometheus(
    workdir: Path, config: dict[str, Any], *, extra_args: tuple[str, ...] = ()
) -> Iterator[Prometheus]:
    """Start Prometheus with *config* (written into *workdir*); stop it by PID."""
    binary = need_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    write_yaml(workdir / "prometheus.yml", config)
    port = free_port(HOST)
    proc = Proc(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
            *extra_args,
        ],
        cwd=workdir,
        log=workdir / "prometheus.log",
    )
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(f"{url}/-/ready", proc)
        yield Prometheus(proc, url)
    finally:
        proc.stop()


# --------------------------------------------------------------------- Alertmanager


def alertmanager_binary() -> str:
    """Debian calls the binary prometheus-alertmanager; upstream calls it alertmanager."""
    for name in ("prometheus-alertmanager", "alertmanager"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("alertmanager is not installed (apt-get install prometheus-alertmanager)")


def alertmanager_test_config(sink_url: str, *, group_wait: str = "0s") -> dict[str, Any]:
    """prometheus/alertmanager.yml with every receiver replaced by a webhook to *sink_url*.

    Routes, matchers and inhibit rules stay as shipped; each receiver posts to
    ``<sink_url>/<receiver name>`` so a test sees which receiver got an alert. Grouping
    delays are test-scaled.
    """
    cfg = load_yaml(PROM_DIR / "alertmanager.yml")
    cfg["global"] = {"resolve_timeout": "5m"}
    cfg.pop("templates", None)
    cfg["receivers"] = [
        {
            "name": r["name"],
            "webhook_configs": [{"url": f"{sink_url}/{r['name']}", "send_resolved": True}],
        }
        for r in cfg["receivers"]
    ]

    def scale(route: dict[str, Any]) -> None:
        route["group_wait"] = group_wait
        route["group_interval"] = "1s"
        for child in route.get("routes", []):
            scale(child)

    scale(cfg["route"])
    return cfg


class Alertmanager:
    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = get_json(f"{self.url}/api/v2/alerts")
        return alerts


@contextmanager
def running_alertmanager(workdir: Path, config: dict[str, Any]) -> Iterator[Alertmanager]:
    """Start Alertmanager (no HA gossip) with *config*; stop it by PID."""
    binary = alertmanager_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    write_yaml(workdir / "alertmanager.yml", config)
    port = free_port(HOST)
    proc = Proc(
        [
            binary,
            f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address={HOST}:{port}",
            "--cluster.listen-address=",  # no gossip listener on 0.0.0.0:9094
            "--log.level=warn",
        ],
        cwd=workdir,
        log=workdir / "alertmanager.log",
    )
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(f"{url}/-/ready", proc)
        yield Alertmanager(proc, url)
    finally:
        proc.stop()


# --------------------------------------------------------------------- webhook sink


class WebhookSink:
    """An HTTP server in a thread that records every POSTed JSON payload."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[float, str, dict[str, Any]]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                with sink.lock:
                    sink.received.append((time.monotonic(), self.path, payload))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def firing(
        self, alertname: str, since: float = 0.0
    ) -> list[tuple[float, str, dict[str, Any]]]:
        """Notifications (time, path, alert) that carry a firing *alertname*, received
        at or after *since* (``time.monotonic()``)."""
        with self.lock:
            items = [item for item in self.received if item[0] >= since]
        found = []
        for t, path, payload in items:
            for alert in payload.get("alerts", []):
                if alert["labels"].get("alertname") == alertname and alert["status"] == "firing":
                    found.append((t, path, alert))
        return found


# --------------------------------------------------------------------- the demo


def need_demo() -> Path:
    """The SoftFactory example directory, or skip the test."""
    if not (DEMO_DIR / "app.py").exists():
        pytest.skip("demo app not available yet")
    return DEMO_DIR


class Demo:
    def __init__(self, proc: Proc, host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.target = f"{host}:{port}"
        self.url = f"http://{host}:{port}"


@contextmanager
def running_demo(
    workdir: Path, *, host: str = HOST, workers: int = 2, env: dict[str, str] | None = None
) -> Iterator[Demo]:
    """``gunicorn -c gunicorn.conf.py app:app`` in examples/softfactory on a free port.

    The database, the logs and the multiprocess store live in *workdir*, so several
    instances can run side by side and nothing is written into the checkout.
    """
    demo_dir = need_demo()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = demo_dir / "gunicorn.conf.py"
    if not conf.exists():
        conf = ROOT / "gunicorn.conf.py"
    port = free_port(host)
    mp_dir = workdir / "multiproc"
    mp_dir.mkdir(exist_ok=True)
    proc_env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(mp_dir),
        "SFMON_LOG_DIR": str(workdir / "logs"),
        "SOFTFACTORY_DB": str(workdir / "softfactory.sqlite3"),
        **(env or {}),
    }
    args = ["-c", str(conf), "-b", f"{host}:{port}", "-w", str(workers), "app:app"]
    proc = Proc([gunicorn_bin(), *args], cwd=demo_dir, env=proc_env, log=workdir / "gunicorn.log")
    try:
        wait_ready(f"http://{host}:{port}/api/metrics/live", proc, timeout=60)
        yield Demo(proc, host, port)
    finally:
        proc.stop()


TRAFFIC_PATHS = (
    "/",
    "/api/coocook/chefs",
    "/api/coocook/bookings",
    "/api/users/active",  # sets softfactory_active_users
    "/api/does-not-exist",  # 404: softfactory_errors_total
    "/api/error",  # 500
)


def send_traffic(base_url: str, rounds: int = 5) -> int:
    """GET a mix of paths (with the seed's demo token); returns the number of requests."""
    n = 0
    for _ in range(rounds):
        for path in TRAFFIC_PATHS:
            req = urllib.request.Request(
                base_url + path, headers={"Authorization": "Bearer demo_token"}
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
            except urllib.error.HTTPError as err:
                err.read()
                err.close()
            n += 1
    return n
