"""Native histograms end to end: gunicorn workers → protobuf → a real Prometheus."""

from __future__ import annotations

import math
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opsutil import PROM_DIR, prometheus_config, running_prometheus, wait_until
from test_gunicorn_core import Server

pytestmark = pytest.mark.integration

SCHEMA = 3
WIDTH = 2 ** (2**-SCHEMA) - 1  # relative width of one schema-3 bucket (~9.05 %)


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
        return r.status


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def scalar(prom: object, expr: str) -> float:
    result = prom.query(expr)  # type: ignore[attr-defined]
    return float(result[0]["value"][1]) if result else math.nan


def test_native_histograms_in_real_prometheus_with_recycled_workers(tmp_path: Path) -> None:
    srv = Server(tmp_path / "app", "-w", "4", "--max-requests", "25")
    rng = random.Random(42)
    values = [round(rng.lognormvariate(math.log(50), 0.8), 3) for _ in range(1500)]
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda v: get(f"{srv.base}/observe?ms={v}"), values))
            statuses += list(pool.map(lambda _: get(f"{srv.base}/ok"), range(500)))
        assert statuses.count(200) == 2000
        target = srv.base.removeprefix("http://")
        cfg = prometheus_config(PROM_DIR / "prometheus-native.yml", targets=[target])
        with running_prometheus(
            tmp_path / "prom-native", cfg, extra_args=("--enable-feature=native-histograms",)
        ) as prom:
            count = wait_until(
                lambda: (
                    scalar(prom, "histogram_count(test_injected_ms)") == len(values)
                    and scalar(prom, 'histogram_count(softfactory_request_latency_ms{path="/ok"})')
                ),
                30,
                "native histogram counts",
            )
            assert count
            ok_count = scalar(prom, 'histogram_count(softfactory_request_latency_ms{path="/ok"})')
            observe_count = scalar(
                prom, 'histogram_count(softfactory_request_latency_ms{path="/observe"})'
            )
            got = {
                q: scalar(prom, f"histogram_quantile({q}, test_injected_ms)")
                for q in (0.5, 0.9, 0.99)
            }
            total = scalar(prom, "histogram_sum(test_injected_ms)")
            classic_in_native = prom.query("test_injected_ms_bucket")
        cfg = prometheus_config(PROM_DIR / "prometheus.yml", targets=[target])
        with running_prometheus(tmp_path / "prom-classic", cfg) as prom:
            wait_until(lambda: prom.query('up{job="softfactory-api"} == 1'), 30, "classic scrape")
            classic_count = wait_until(
                lambda: scalar(prom, 'sum(softfactory_request_latency_ms_count{path="/ok"})'),
                30,
                "classic counts",
            )
            buckets = prom.query('test_injected_ms_bucket{le="100.0"}')
            requests = scalar(prom, 'sum(softfactory_requests_total{path="/ok"})')
    finally:
        srv.stop()

    assert ok_count == 500 and observe_count == len(values)
    # sums are stored in 1/65536 units: at most half a unit of rounding per observation
    assert abs(total - sum(values)) <= len(values) / 2 / 65536
    for q, value in got.items():
        exact = exact_quantile(values, q)
        assert abs(value - exact) <= WIDTH * exact, (q, value, exact)
    assert classic_in_native == []  # 2.42 keeps only the native series when both are sent
    assert classic_count == 500 and requests == 500
    assert len(buckets) == 1
    assert float(buckets[0]["value"][1]) == sum(1 for v in values if v <= 100)
