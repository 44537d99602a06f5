"""Probes, reports, checks and endpoint protection, in-process."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from support import BufferedClient as Client

import sfmon
from sfmon import readiness
from sfmon.health import CheckRunner, human_duration

_ns = itertools.count()


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    environ["sfmon.route"] = "/boom" if environ["PATH_INFO"] == "/boom" else "/ok"
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def client(**options: Any) -> Client:
    options.setdefault("namespace", f"h{next(_ns)}")
    options.setdefault("access_log", False)
    return Client(sfmon.Monitor(app, **options))


def test_health_ready_live_with_passing_checks(store_dir: str) -> None:
    c = client(checks={"database": lambda: True})

    health, ready, live = (c.get(f"/api/metrics/{p}") for p in ("health", "ready", "live"))

    assert health.status_code == 200
    assert {k: health.json[k] for k in ("status", "database", "api")} == {
        "status": "healthy",
        "database": "healthy",
        "api": "ok",
    }
    assert health.json["timestamp"].endswith("Z")
    assert health.json["checks"]["database"]["status"] == "pass"
    assert health.headers["Content-Type"] == "application/json"
    assert ready.status_code == 200 and ready.json["ready"] is True
    assert live.status_code == 200 and live.json["pid"] == os.getpid()


def test_failing_database_check_degrades_health_and_readiness_not_liveness(
    store_dir: str, tmp_path: Path
) -> None:
    db = tmp_path / "app.sqlite3"
    import sqlite3

    sqlite3.connect(db).close()
    c = client(checks={"database": sfmon.sqlite_check(str(db))}, check_ttl=0.2)
    assert c.get("/api/metrics/health").status_code == 200

    db.rename(tmp_path / "moved")
    time.sleep(0.3)
    health, ready, live = (c.get(f"/api/metrics/{p}") for p in ("health", "ready", "live"))

    assert health.status_code == 503
    assert (health.json["status"], health.json["database"]) == ("degraded", "unhealthy")
    assert "missing" in health.json["checks"]["database"]["error"]
    assert ready.status_code == 503 and ready.json["ready"] is False
    assert live.status_code == 200
    (tmp_path / "moved").rename(db)
    time.sleep(0.3)
    assert c.get("/api/metrics/health").status_code == 200


def test_hung_check_never_hangs_the_probe(store_dir: str) -> None:
    never = threading.Event()
    c = client(checks={"stuck": lambda: never.wait(), "fine": lambda: True}, check_timeout=0.5)

    started = time.monotonic()
    resp = c.get("/api/metrics/health")
    took = time.monotonic() - started
    again = time.monotonic()
    c.get("/api/metrics/health")
    took_again = time.monotonic() - again
    never.set()

    assert resp.status_code == 503
    assert "timed out" in resp.json["checks"]["stuck"]["error"]
    assert resp.json["checks"]["fine"]["status"] == "pass"
    assert took < 0.5 + 0.5 and took_again < 0.5 + 0.5


def test_check_results_are_cached_for_the_ttl() -> None:
    calls: list[int] = []
    runner = CheckRunner({"c": lambda: calls.append(1)}, timeout=1, ttl=60)

    for _ in range(5):
        ok, _results = runner.run()

    assert ok is True and calls == [1]


def test_check_returning_false_fails() -> None:
    ok, results = CheckRunner({"c": lambda: False}, timeout=1, ttl=60).run()
    assert ok is False and results["c"].error == "check returned False"


def test_ready_is_503_before_startup_and_while_draining(store_dir: str) -> None:
    c = client()
    readiness.reset(store_dir)  # as gunicorn's on_starting does

    starting = c.get("/api/metrics/ready")
    readiness.mark_started(store_dir)
    started = c.get("/api/metrics/ready")
    readiness.mark_draining(store_dir)
    draining = c.get("/api/metrics/ready")
    readiness._local_draining = False

    assert (starting.status_code, starting.json["reasons"]) == (503, ["starting"])
    assert started.status_code == 200
    assert (draining.status_code, draining.json["reasons"]) == (503, ["draining"])


def test_summary_and_errors_reports(store_dir: str) -> None:
    c = client(stats=lambda: {"users": 256, "size_bytes": 4096})
    for _ in range(3):
        c.get("/ok")
    with pytest.raises(RuntimeError):
        c.get("/boom")

    summary = c.get("/api/metrics/summary").json
    errors = c.get("/api/metrics/errors").json

    assert summary["application"] == {"requests_total": 4, "errors_total": 1, "error_rate": 25.0}
    assert summary["database"]["stats"] == {"users": 256, "size_bytes": 4096}
    assert set(summary["system"]["memory"]) == {"rss_mb", "vms_mb", "percent"}
    assert summary["uptime"]["human_readable"].endswith("s")
    rows = {(r["method"], r["path"]): r for r in summary["endpoints"]}
    assert rows[("GET", "/ok")]["count"] == 3 and rows[("GET", "/boom")]["error_rate"] == 100.0
    assert rows[("GET", "/ok")]["p50_ms"] is not None
    assert [w["requests"] for w in summary["workers"]] == [4]
    assert errors["error_rate_percent"] == 25.0
    assert errors["by_status"] == {"500": 1}
    assert errors["by_endpoint"] == {"GET /boom": 1}
    assert [(e["route"], e["status"], e["exception"]) for e in errors["recent"]] == [
        ("/boom", 500, "RuntimeError")
    ]


def test_head_and_other_methods(store_dir: str) -> None:
    c = client()

    head = c.head("/api/metrics/health")
    post = c.post("/api/metrics/summary")

    assert head.status_code == 200 and head.data == b""
    assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD"


def test_protection_token_and_allow_list(store_dir: str) -> None:
    c = client(
        metrics_token="s3cret-token", metrics_allow=["10.0.0.0/8"], trusted_proxies=["127.0.0.1"]
    )
    inside = {"REMOTE_ADDR": "10.1.2.3"}
    auth = {"Authorization": "Bearer s3cret-token"}
    c.get("/ok")

    no_token = c.get("/api/metrics/prometheus", environ_overrides=inside)
    wrong = c.get(
        "/api/metrics/summary", environ_overrides=inside, headers={"Authorization": "Bearer nope"}
    )
    outside = c.get(
        "/api/metrics/errors", environ_overrides={"REMOTE_ADDR": "192.0.2.1"}, headers=auth
    )
    good = c.get("/api/metrics/prometheus", environ_overrides=inside, headers=auth)
    via_proxy = c.get(
        "/api/metrics/summary",
        headers={**auth, "X-Forwarded-For": "10.9.9.9"},
        environ_overrides={"REMOTE_ADDR": "127.0.0.1"},
    )
    spoofed = c.get(
        "/api/metrics/summary",
        headers={**auth, "X-Forwarded-For": "10.9.9.9"},
        environ_overrides={"REMOTE_ADDR": "192.0.2.7"},
    )
    probes = [
        c.get(f"/api/metrics/{p}", environ_overrides={"REMOTE_ADDR": "192.0.2.1"})
        for p in ("health", "ready", "live")
    ]

    assert no_token.status_code == 401 and b"softfactory" not in no_token.data
    assert no_token.headers["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert outside.status_code == 403 and b"requests_total" not in outside.data
    assert good.status_code == 200 and b"_requests_total" in good.data
    assert via_proxy.status_code == 200
    assert spoofed.status_code == 403
    assert [p.status_code for p in probes] == [200, 200, 200]


def test_metric_families_from_checks_stats_and_system(store_dir: str) -> None:
    c = client(checks={"database": lambda: True}, stats=lambda: {"users": 3})
    c.get("/ok")
    ns = c.application.settings.namespace  # type: ignore[attr-defined]

    text = c.get("/api/metrics/prometheus").data.decode()

    for line in (
        f"{ns}_up 1.0",
        f"{ns}_database_status 1.0",
        f"{ns}_database_users 3.0",
        f"{ns}_workers 1.0",
        f"{ns}_workers_busy 0.0",
    ):
        assert line in text
    for name in (
        f"{ns}_memory_rss_mb",
        f"{ns}_memory_percent",
        f"{ns}_cpu_percent",
        f"{ns}_log_disk_free_ratio",
        f"{ns}_uptime_seconds",
        f"{ns}_build_info",
        f"{ns}_config_info",
        f'{ns}_worker_memory_rss_bytes{{worker="0"}}',
    ):
        assert name in text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0h 0m 0s"), (3600, "1h 0m 0s"), (90061, "1d 1h 1m 1s")]
)
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text
