"""Scrape time against dead workers: sfmon's store vs prometheus_client's multiprocess mode.

Dead workers are simulated by forked children that record *series* label sets (counter
series, plus a histogram series for every tenth) and exit. For sfmon they are folded as
gunicorn's ``child_exit`` would (``sfmon.compact.fold_dead_workers``); prometheus_client
keeps every dead worker's files (``mark_process_dead`` removes only live gauges). The
"no dead" baseline is one live worker holding the same series. A scrape is the text
exposition as each endpoint builds it (sfmon: one ``build_registry`` per worker, then
``render`` per scrape; prometheus_client: a fresh ``MultiProcessCollector`` registry +
``generate_latest`` per scrape); wall-clock median of repeats. Usage::

    python bench/scrape.py [--repeats 5] [--sizes 2x200,20x200,200x200,...]
    python bench/scrape.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

_SFMON_FAMILIES: list[Any] = []


def _sfmon_families() -> tuple[Any, Any]:
    if not _SFMON_FAMILIES:
        from sfmon import metrics

        _SFMON_FAMILIES.extend(
            (
                metrics.counter(
                    "bench_requests_total", "r", ["method", "path", "status"], max_series=10**6
                ),
                metrics.histogram(
                    "bench_latency_ms", "l", ["method", "path"], native=True, max_series=10**6
                ),
            )
        )
    return _SFMON_FAMILIES[0], _SFMON_FAMILIES[1]


def _write_sfmon(series: int) -> None:
    c, h = _sfmon_families()
    for i in range(series):
        c.labels("GET", f"/r{i}", "200").inc()
        if i % 10 == 0:
            h.labels("GET", f"/r{i}").observe(3.0 + i)


def _write_pc(series: int) -> None:
    import prometheus_client

    c = prometheus_client.Counter(
        "bench_requests", "r", ["method", "path", "status"], registry=None
    )
    h = prometheus_client.Histogram(
        "bench_latency_seconds", "l", ["method", "path"], registry=None
    )
    for i in range(series):
        c.labels("GET", f"/r{i}", "200").inc()
        if i % 10 == 0:
            h.labels("GET", f"/r{i}").observe(0.003 + i / 1000)


def fork_workers(write: Callable[[], None], count: int) -> None:
    """*count* workers that write and exit, one after the other (as recycled workers)."""
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                write()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


class LiveWorker:
    """A forked worker that writes, then stays alive until stopped."""

    def __init__(self, write: Callable[[], None]) -> None:
        ready_r, ready_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(ready_r)
                write()
                os.write(ready_w, b"1")
                os.read(self._stop_r, 1)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)

    def stop(self) -> None:
        os.write(self._stop_w, b"1")
        os.waitpid(self.pid, 0)
        os.close(self._stop_w)
        os.close(self._stop_r)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock ms of *fn* over *repeats* calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def sfmon_scrape(mp_dir: str, repeats: int) -> float:
    from sfmon.exposition import StoreCollector, build_registry, render

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir  # no prometheus_client files in it

    # One collector per worker, reused by every scrape, as sfmon's endpoint keeps it.
    # sweep=False: the "unfolded" measurement must not fold the dead files itself.
    registry = build_registry(StoreCollector(os.path.join(mp_dir, "sfmon"), sweep=False))

    def scrape() -> None:
        render(registry, None, None)

    return timed(scrape, repeats)


def pc_scrape(mp_dir: str, repeats: int) -> float:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    def scrape() -> None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, mp_dir)
        generate_latest(registry)

    return timed(scrape, repeats)


def _fresh(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, "sfmon"))
    return path


def measure(root: str, dead: int, series: int, repeats: int) -> dict[str, Any]:
    from sfmon import store

    try:
        from sfmon.compact import fold_dead_workers
    except ImportError:  # before the fold moved out of sfmon.merge
        from sfmon.merge import fold_dead_workers  # type: ignore[attr-defined,no-redef]

    out: dict[str, Any] = {"dead": dead, "series": series}
    tag = f"{dead}x{series}"

    # sfmon: dead workers, unfolded then folded
    sf = _fresh(root, f"sf-{tag}")
    store.reset_for_tests(os.path.join(sf, "sfmon"))
    fork_workers(lambda: _write_sfmon(series), dead)
    out["sfmon_unfolded_ms"] = sfmon_scrape(sf, repeats)
    t = time.perf_counter()
    fold_dead_workers(os.path.join(sf, "sfmon"))
    out["sfmon_fold_ms_per_worker"] = (time.perf_counter() - t) * 1000 / dead
    out["sfmon_ms"] = sfmon_scrape(sf, repeats)
    out["sfmon_files"] = len(
        [n for n in os.listdir(os.path.join(sf, "sfmon")) if n.endswith(".sfm")]
    )
    # sfmon: the same series in one live worker, no dead workers
    base = _fresh(root, f"sf-base-{tag}")
    store.reset_for_tests(os.path.join(base, "sfmon"))
    live = LiveWorker(lambda: _write_sfmon(series))
    try:
        out["sfmon_no_dead_ms"] = sfmon_scrape(base, repeats)
    finally:
        live.stop()
    store.reset_for_tests(None)

    # prometheus_client multiprocess: dead workers' files stay
    pc = _fresh(root, f"pc-{tag}")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = pc
    fork_workers(lambda: _write_pc(series), dead)
    out["pc_ms"] = pc_scrape(pc, max(1, repeats // 2) if dead * series > 100_000 else repeats)
    out["pc_files"] = len([n for n in os.listdir(pc) if n.endswith(".db")])
    pc_base = _fresh(root, f"pc-base-{tag}")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = pc_base
    live = LiveWorker(lambda: _write_pc(series))
    try:
        out["pc_no_dead_ms"] = pc_scrape(pc_base, repeats)
    finally:
        live.stop()
    out["sfmon_vs_no_dead"] = out["sfmon_ms"] / out["sfmon_no_dead_ms"]
    out["pc_vs_no_dead"] = out["pc_ms"] / out["pc_no_dead_ms"]
    for d in (sf, base, pc, pc_base):
        shutil.rmtree(d, ignore_errors=True)
    return out


def print_table(data: dict[str, Any]) -> None:
    print(
        f"\nScrape (text exposition) vs dead workers, ms, wall-clock median of {data['repeats']}:"
    )
    print(
        f"  {'dead':>5} {'series':>6} | {'sfmon':>7} {'no dead':>7} {'ratio':>6} "
        f"{'unfolded':>8} {'fold/w':>7} {'files':>5} | {'prom_client':>11} {'no dead':>7} "
        f"{'ratio':>6} {'files':>5}"
    )
    for r in data["results"]:
        print(
            f"  {r['dead']:5d} {r['series']:6d} | {r['sfmon_ms']:7.2f} {r['sfmon_no_dead_ms']:7.2f} "
            f"{r['sfmon_vs_no_dead']:6.2f} {r['sfmon_unfolded_ms']:8.1f} "
            f"{r['sfmon_fold_ms_per_worker']:7.2f} {r['sfmon_files']:5d} | {r['pc_ms']:11.1f} "
            f"{r['pc_no_dead_ms']:7.2f} {r['pc_vs_no_dead']:6.1f} {r['pc_files']:5d}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", help="comma-separated DEADxSERIES (default: 2,20,200 x 200,2000)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    repeats = args.repeats
    sizes = [(d, s) for s in (200, 2000) for d in (2, 20, 200)]
    if args.smoke:
        sizes, repeats = [(2, 20), (5, 20)], 2
    elif args.quick:
        sizes, repeats = [(2, 200), (200, 200), (20, 2000)], 3
    if args.sizes:
        sizes = [tuple(map(int, x.split("x"))) for x in args.sizes.split(",")]  # type: ignore[misc]
    machine = peers.machine_info()
    root = tempfile.mkdtemp(prefix="sfmon-bench-scrape-")
    # prometheus_client picks multiprocess mode when it is imported: set the variable first.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = root
    try:
        results = [measure(root, d, s, repeats) for d, s in sizes]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    data = {
        "machine": machine,
        "load_end": peers.load_average(),
        "repeats": repeats,
        "results": results,
    }
    print_table(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
