"""Core benchmarks: in-process cost per request and scrape cost vs dead workers.

Prints medians of repeats (CPU time, ``time.process_time``), with the variants of
one table measured interleaved in the same run. Usage::

    .venv/bin/python bench/bench_core.py            # full sizes
    .venv/bin/python bench/bench_core.py --smoke    # tiny sizes (CI smoke)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bare(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["sfmon.route"] = "/api/items/<id>"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def drive(app: Callable[..., Any], n: int) -> float:
    """CPU seconds to serve *n* requests the way a sync server does."""
    environ: dict[str, Any] = {"PATH_INFO": "/api/items/7", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    t = time.process_time()
    for _ in range(n):
        env = dict(environ)
        body = app(env, start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return time.process_time() - t


def prometheus_client_floor(mpdir: str) -> Callable[..., Any]:
    """prometheus_client multiprocess Counter + Histogram, written by hand (the floor)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir
    import prometheus_client

    c = prometheus_client.Counter("floor_requests", "r", ["method", "path", "status"])
    h = prometheus_client.Histogram("floor_latency_seconds", "l", ["method", "path"])

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        t = time.perf_counter()
        body = bare(environ, start_response)
        c.labels("GET", "/api/items/<id>", "200").inc()
        h.labels("GET", "/api/items/<id>").observe(time.perf_counter() - t)
        return body

    return app


def bench_inprocess(n: int, repeats: int) -> None:
    import sfmon
    from sfmon import store

    tmp = tempfile.mkdtemp(prefix="sfmon-bench-")
    store.configure_directory(os.path.join(tmp, "sfmon"))
    variants = {
        "bare WSGI app": bare,
        "prometheus_client mp floor": prometheus_client_floor(os.path.join(tmp, "pc")),
        "sfmon metrics only": sfmon.Monitor(
            bare, namespace="b1", access_log=False, native_histograms=False
        ),
        "sfmon metrics + native": sfmon.Monitor(bare, namespace="b2", access_log=False),
    }
    os.makedirs(os.path.join(tmp, "pc"), exist_ok=True)
    results: dict[str, list[float]] = {k: [] for k in variants}
    for app in variants.values():
        drive(app, min(n, 2000))  # warm caches, create files
    for _ in range(repeats):
        for name, app in variants.items():  # interleaved
            results[name].append(drive(app, n) / n * 1e6)
    base = statistics.median(results["bare WSGI app"])
    print(f"\nIn-process CPU per request (n={n}, median of {repeats}), µs:")
    print(f"  {'variant':32} {'total':>8} {'over bare':>10}")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"  {name:32} {med:8.2f} {med - base:10.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


def make_dead_workers(directory: str, dead: int, series: int) -> None:
    """Simulate *dead* exited workers, each having written *series* series."""
    from sfmon import metrics, store

    c = metrics.FAMILIES.get("bench_requests_total") or metrics.counter(
        "bench_requests_total", "r", ["method", "path", "status"], max_series=10**6
    )
    h = metrics.FAMILIES.get("bench_latency_ms") or metrics.histogram(
        "bench_latency_ms", "l", ["method", "path"], native=True, max_series=10**6
    )
    for _ in range(dead):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(series):
                    c.labels("GET", f"/r{i}", "200").inc()  # type: ignore[union-attr]
                    if i % 10 == 0:
                        h.labels("GET", f"/r{i}").observe(3.0 + i)  # type: ignore[union-attr]
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    store.reset_for_tests(directory)


def bench_scrape(sizes: list[tuple[int, int]], repeats: int) -> None:
    from sfmon import store
    from sfmon.compact import fold_dead_workers
    from sfmon.exposition import StoreCollector, build_registry, render
    from sfmon.protobuf_exposition import protobuf_body

    PROTO = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"

    print("\nScrape (text exposition) vs dead workers, ms (median):")
    print(
        f"  {'dead':>5} {'series':>7} {'unfolded':>10} {'folded':>8} {'no dead':>8} {'protobuf':>9} {'files':>6}"
    )
    for dead, series in sizes:
        tmp = tempfile.mkdtemp(prefix="sfmon-bench-scrape-")
        store.reset_for_tests(tmp)
        make_dead_workers(tmp, dead, series)

        def timed(directory: str, proto: bool = False) -> float:
            col = StoreCollector(directory, sweep=False)
            reg = build_registry(col)
            accept = PROTO if proto else None
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                render(reg, accept, None, protobuf=lambda: protobuf_body(reg, col))
                times.append(time.perf_counter() - t)
            return statistics.median(times) * 1000

        unfolded = timed(tmp)
        fold_dead_workers(tmp)
        folded = timed(tmp)
        folded_pb = timed(tmp, proto=True)
        files = len([n for n in os.listdir(tmp) if n.endswith(".sfm")])
        single = tempfile.mkdtemp(prefix="sfmon-bench-one-")
        store.reset_for_tests(single)
        make_dead_workers(single, 1, series)
        fold_dead_workers(single)
        baseline = timed(single)
        print(
            f"  {dead:5d} {series:7d} {unfolded:10.2f} {folded:8.2f} {baseline:8.2f} "
            f"{folded_pb:9.2f} {files:6d}"
        )
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(single, ignore_errors=True)
    store.reset_for_tests(None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = ap.parse_args()
    if args.smoke:
        bench_inprocess(2000, 3)
        bench_scrape([(2, 20)], 3)
    else:
        bench_inprocess(50_000, 7)
        bench_scrape([(2, 200), (20, 200), (200, 200), (20, 2000)], 7)


if __name__ == "__main__":
    main()
