"""Endpoints under real gunicorn: figures merged across workers, DB outage, CPU, load."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import ROOT, http_get, need_binary
from test_gunicorn_core import Server

pytestmark = pytest.mark.integration
DEMO = str(ROOT / "examples" / "softfactory")
AUTH = {"Authorization": "Bearer demo_token"}


def demo(tmp_path: Path, workers: int = 2, **env: str) -> Server:
    srv = Server(
        tmp_path,
        "-w",
        str(workers),
        "--chdir",
        DEMO,
        app="app:app",
        env={"SOFTFACTORY_DB": str(tmp_path / "demo.sqlite3"), **env},
    )
    srv.wait_workers(workers)  # every worker has imported the app (and created the DB)
    return srv


def get_json(url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    status, _, body = http_get(url)
    return status, json.loads(body)


def test_summary_and_errors_merge_all_workers(tmp_path: Path) -> None:
    srv = demo(tmp_path, workers=2)
    try:
        sent = 60
        paths = ["/api/error" if i % 3 == 0 else "/api/coocook/chefs" for i in range(sent)]
        with ThreadPoolExecutor(6) as pool:  # concurrent, so both workers record errors
            list(pool.map(lambda p: http_get(srv.base + p, AUTH), paths))
        for _ in range(20):
            _, errors = get_json(srv.base + "/api/metrics/errors")
            foreign = [e for e in errors["recent"] if e["pid"] != errors["answered_by"]]
            if foreign:
                break
        _, summary = get_json(srv.base + "/api/metrics/summary")
    finally:
        srv.stop()

    assert summary["application"]["requests_total"] == sent
    assert summary["application"]["errors_total"] == sent // 3
    assert errors["errors_total"] == sent // 3
    assert foreign, f"no error from another worker in {errors['recent'][:3]}"
    assert foreign[0]["route"] == "/api/error" and foreign[0]["exception"] == "RuntimeError"
    assert len(summary["workers"]) == 2
    assert sorted(w["slot"] for w in summary["workers"]) == [0, 1]
    assert sum(w["requests"] for w in summary["workers"]) <= sent


def test_database_outage_and_recovery(tmp_path: Path) -> None:
    srv = demo(tmp_path, workers=2, SFMON_CHECK_TTL="1")
    db = tmp_path / "demo.sqlite3"
    try:
        assert http_get(srv.base + "/api/metrics/health")[0] == 200
        db.rename(tmp_path / "away.sqlite3")
        time.sleep(1.2)
        h_status, health = get_json(srv.base + "/api/metrics/health")
        r_status, _ = get_json(srv.base + "/api/metrics/ready")
        l_status, _ = get_json(srv.base + "/api/metrics/live")
        (tmp_path / "away.sqlite3").rename(db)
        deadline = time.monotonic() + 1.0 + 2.0
        recovered = None
        while time.monotonic() < deadline:
            if http_get(srv.base + "/api/metrics/health")[0] == 200:
                recovered = time.monotonic()
                break
            time.sleep(0.1)
    finally:
        srv.stop()

    assert (h_status, health["status"], health["database"]) == (503, "degraded", "unhealthy")
    assert r_status == 503 and l_status == 200
    assert recovered is not None


def test_cpu_percent_is_above_zero_while_a_cpu_bound_request_runs(tmp_path: Path) -> None:
    srv = demo(tmp_path, workers=2)
    try:
        burner = threading.Thread(target=http_get, args=(srv.base + "/api/cpu?s=3", AUTH))
        burner.start()
        time.sleep(0.5)
        _, first = get_json(srv.base + "/api/metrics/summary")
        time.sleep(0.5)
        _, second = get_json(srv.base + "/api/metrics/summary")
        burner.join()
    finally:
        srv.stop()

    assert max(first["system"]["cpu_percent"], second["system"]["cpu_percent"]) > 0
    assert any(w["busy"] for w in first["workers"] + second["workers"])


def test_protection_under_gunicorn(tmp_path: Path) -> None:
    srv = demo(tmp_path, workers=2, SFMON_METRICS_TOKEN="t0ken-t0ken")
    try:
        no_token = http_get(srv.base + "/api/metrics/prometheus")
        with_token = http_get(
            srv.base + "/api/metrics/prometheus", {"Authorization": "Bearer t0ken-t0ken"}
        )
        probes = [http_get(srv.base + f"/api/metrics/{p}")[0] for p in ("health", "ready", "live")]
    finally:
        srv.stop()

    assert no_token[0] == 401 and b"softfactory_" not in no_token[2]
    assert with_token[0] == 200 and b"softfactory_up 1.0" in with_token[2]
    assert probes == [200, 200, 200]


@pytest.mark.slow
def test_ab_10000_requests_on_health_without_failures(tmp_path: Path) -> None:
    ab = need_binary("ab")
    srv = demo(tmp_path, workers=4)
    try:
        out = subprocess.run(
            [ab, "-q", "-l", "-n", "10000", "-c", "100", srv.base + "/api/metrics/health"],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    finally:
        srv.stop()
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    complete = int(re.search(r"Complete requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    print(f"ab: {complete} complete, {failed} failed, {rps.group(1) if rps else '?'} req/s")
    assert (complete, failed) == (10000, 0)
