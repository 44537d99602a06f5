"""Memory: a worker's RSS growth over 100k requests, and store bytes per series.

RSS: every variant (``bench/peers.py``) runs in a forked child, as a gunicorn worker
would: build the app, serve a warm-up, read RSS (``psutil``), serve *n* more requests
in-process, read RSS again. Flat means the growth stays under 1 MiB.

Store bytes per series: a fresh process allocates *S* label sets of a counter and of a
histogram (one observation each) in sfmon's store and in prometheus_client's
multiprocess files; the bytes used, divided by *S*. Usage::

    python bench/memory.py [--n 100000] [--variants trivial,flask/sfmon]
    python bench/memory.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers


def in_child(fn: Callable[[], dict[str, Any]]) -> Any:
    """Run *fn* in a forked child and return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            payload = json.dumps(fn()).encode()
        except BaseException as exc:
            payload = json.dumps({"error": repr(exc)}).encode()
            code = 1
        try:
            with os.fdopen(w, "wb") as f:
                f.write(payload)
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def collect(pid: int, fd: int) -> Any:
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data or b'{"error": "child died"}')


def rss_growth(variant: peers.Variant, ctx: peers.Context, n: int, warmup: int) -> dict[str, Any]:
    import psutil

    proc = psutil.Process()
    app = variant.build(ctx)
    variant.activate(ctx)
    peers.drive(app, warmup)
    gc.collect()
    before = proc.memory_info().rss
    peers.drive(app, n)
    gc.collect()
    after = proc.memory_info().rss
    return {
        "label": variant.label,
        "rss_mib": after / 2**20,
        "growth_kib": (after - before) / 1024,
        "requests": n,
    }


def sfmon_bytes_per_series(directory: str, count: int) -> dict[str, Any]:
    from sfmon import metrics, store

    store.reset_for_tests(directory)
    w = store.get_writer()
    out: dict[str, Any] = {}
    c = metrics.counter(
        "bytes_requests_total", "r", ["method", "path", "status"], max_series=10**6
    )
    classic = metrics.histogram(
        "bytes_classic_ms", "l", ["method", "path"], native=False, max_series=10**6
    )
    native = metrics.histogram(
        "bytes_native_ms", "l", ["method", "path"], native=True, max_series=10**6
    )
    for name, record in (
        ("counter", lambda i: c.labels("GET", f"/api/items/{i}", "200").inc()),
        ("histogram", lambda i: classic.labels("GET", f"/api/items/{i}").observe(12.5)),
        ("native histogram", lambda i: native.labels("GET", f"/api/items/{i}").observe(12.5)),
    ):
        record(-1)  # the family record is written once, not per series
        used = w.used
        for i in range(count):
            record(i)
        out[name] = (w.used - used) / count
    store.reset_for_tests(None)
    return out


def pc_bytes_per_series(directory: str, count: int) -> dict[str, Any]:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    import prometheus_client

    c = prometheus_client.Counter("bytes_requests", "r", ["method", "path", "status"])
    h = prometheus_client.Histogram("bytes_latency_seconds", "l", ["method", "path"])
    for i in range(count):
        c.labels("GET", f"/api/items/{i}", "200").inc()
        h.labels("GET", f"/api/items/{i}").observe(0.0125)
    out: dict[str, Any] = {}
    for prefix, name in (("counter_", "counter"), ("histogram_", "histogram")):
        for f in os.listdir(directory):
            if f.startswith(prefix) and f.endswith(".db"):
                with open(os.path.join(directory, f), "rb") as fh:
                    used = struct.unpack("i", fh.read(4))[0]  # mmap_dict's used-bytes header
                out[name] = (used - 8) / count
    return out


def run(keys: str | None, n: int, warmup: int, series: int, parallel: int) -> dict[str, Any]:
    machine = peers.machine_info()
    tmp = tempfile.mkdtemp(prefix="sfmon-bench-memory-")
    ctx = peers.prepare_environment(tmp)
    try:
        chosen, skipped = [], {}
        for v in peers.select(keys):
            why = v.missing()
            if why:
                skipped[v.key] = f"{why} not installed"
            else:
                chosen.append(v)
        results: dict[str, Any] = {}
        pending: list[tuple[str, int, int]] = []
        for v in chosen:
            pid, fd = in_child(lambda v=v: rss_growth(v, ctx, n, warmup))  # type: ignore[misc]
            pending.append((v.key, pid, fd))
            if len(pending) >= parallel:
                key, pid, fd = pending.pop(0)
                results[key] = collect(pid, fd)
        for key, pid, fd in pending:
            results[key] = collect(pid, fd)
        results = {v.key: results[v.key] for v in chosen}  # table order
        d1 = os.path.join(tmp, "bytes-sfmon")
        d2 = os.path.join(tmp, "bytes-pc")
        os.makedirs(d1)
        os.makedirs(d2)
        store_bytes = {
            "series": series,
            "sfmon": collect(*in_child(lambda: sfmon_bytes_per_series(d1, series))),
            "prometheus_client": collect(*in_child(lambda: pc_bytes_per_series(d2, series))),
        }
        return {
            "machine": machine,
            "load_end": peers.load_average(),
            "n": n,
            "results": results,
            "skipped": skipped,
            "store_bytes": store_bytes,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(data: dict[str, Any]) -> None:
    print(f"\nWorker RSS over {data['n']} requests (after a warm-up), forked child per variant:")
    print(f"  {'variant':52} {'RSS MiB':>8} {'growth KiB':>11}")
    for r in data["results"].values():
        if "error" in r:
            print(f"  {'?':52} error: {r['error']}")
            continue
        print(f"  {r['label']:52} {r['rss_mib']:8.1f} {r['growth_kib']:11.0f}")
    for key, why in data["skipped"].items():
        print(f"  {key:52} skipped: {why}")
    sb = data["store_bytes"]
    print(f"\nStore bytes per series ({sb['series']} series, one observation each):")
    for who in ("sfmon", "prometheus_client"):
        vals = ", ".join(f"{k} {v:.0f}" for k, v in sb[who].items())
        print(f"  {who:18} {vals}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=2, help="children at once")
    ap.add_argument("--variants")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    n, warmup, series = args.n, 2000, args.series
    if args.smoke:
        n, warmup, series = 500, 100, 50
    elif args.quick:
        n = 30_000
    data = run(args.variants, n, warmup, series, args.parallel)
    print_table(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
