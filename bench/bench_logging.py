"""CPU cost of one access line: sfmon's AccessLogSink against python-json-logger via logging.

Prints CPU microseconds per line (``time.process_time``), the median of several repeats,
for each set-up; with ``--cold`` also the wall time of single lines written with the CPU
caches made cold first (as between two requests of a real server, where one line costs
several times what it does in a loop); with ``--procs`` the multi-process cost of sfmon's
rotating file against concurrent-log-handler (when installed). Run from a checkout:

    .venv/bin/python bench/bench_logging.py [--lines 20000] [--repeats 7] [--cold 2000] [--procs 4]
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import json
import logging
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pythonjsonlogger.json import JsonFormatter as PjlJsonFormatter

from sfmon.access_log import AccessLogSink
from sfmon.logfiles import DailyRotatingFileHandler, LogFile
from sfmon.logs import JsonFormatter, JsonStreamHandler, RequestContextFilter
from sfmon.record import RequestRecord
from sfmon.request_id import current_request_id


def make_record(i: int) -> RequestRecord:
    return RequestRecord(
        request_id="a1b2c3d4e5f60718293a4b5c6d7e8f90",
        trace_id=None,
        method="POST",
        method_label="POST",
        path="/api/coocook/bookings/42",
        route="/api/coocook/bookings/<int:id>",
        status=200,
        content_length=256,
        latency_ms=45.3 + i % 7,
        ttfb_ms=40.1,
        started_at=time.time(),
        user_id="42",
        client_addr="10.0.0.7",
        exception=None,
        exc_info=None,
    )


def fresh_logger(name: str, *handlers: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def measure(fns: dict[str, Callable[[int], None]], lines: int, repeats: int) -> dict[str, float]:
    """Median CPU µs per call of each fn(i); repeats interleave the set-ups so that
    noise from other tenants of the machine hits them all alike."""
    results: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            for i in range(lines):
                fn(i)
            results[name].append((time.process_time() - t0) / lines * 1e6)
    return {name: statistics.median(values) for name, values in results.items()}


class _Evictor:
    """Unrelated work between two timed lines, enough to push the line's code and data
    out of the CPU caches: JSON, a regex, a walk over many small objects, and a sweep
    over a buffer larger than the L2 cache."""

    def __init__(self) -> None:
        self.doc = {f"k{i}": [i, str(i), {"x": i * 1.5}] for i in range(300)}
        self.text = " ".join(f"key{i}={i}" for i in range(300))
        self.objects = [{"a": i, "b": str(i)} for i in range(20000)]
        self.buf = bytearray(4 << 20)

    def __call__(self) -> int:
        json.loads(json.dumps(self.doc))
        total = len(re.findall(r"(\w+)=(\d+)", self.text))
        for o in self.objects[::3]:
            total += o["a"]
        self.buf[::64] = bytes(len(self.buf) // 64)
        return total


def measure_cold(fns: dict[str, Callable[[int], None]], lines: int) -> dict[str, float]:
    """Median wall µs of one call of each fn(i) right after evicting the caches; the
    set-ups take turns, in a shuffled order each round."""
    evict = _Evictor()
    results: dict[str, list[int]] = {name: [] for name in fns}
    items = list(fns.items())
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()  # a collection inside one timed call would dwarf it
    try:
        for i in range(lines):
            random.shuffle(items)
            for name, fn in items:
                evict()
                t0 = clock()
                fn(i)
                results[name].append(clock() - t0)
    finally:
        gc.enable()
    return {name: statistics.median(values) / 1000 for name, values in results.items()}


def scenarios(tmp: Path) -> dict[str, Callable[[int], None]]:
    records = [make_record(i) for i in range(64)]
    devnull = open(os.devnull, "w")  # noqa: SIM115 (kept for the whole run)
    out: dict[str, Callable[[int], None]] = {}

    # 1. sfmon sink -> one sfmon rotating file (fast path, no LogRecord).
    h = DailyRotatingFileHandler(tmp / "one.log")
    h.setFormatter(JsonFormatter())
    h.addFilter(RequestContextFilter())
    sink1 = AccessLogSink(fresh_logger("bench.one", h), error_logger=None)
    out["sfmon AccessLogSink -> 1 file"] = lambda i: sink1(records[i & 63])

    # 2. the configure_logging layout: access.log + app.log + stdout (to /dev/null).
    fmt = JsonFormatter()
    ctx = RequestContextFilter()
    hs = []
    for h in (
        DailyRotatingFileHandler(tmp / "access.log"),
        DailyRotatingFileHandler(tmp / "app.log"),
        JsonStreamHandler(devnull),
    ):
        h.setFormatter(fmt)
        h.addFilter(ctx)
        hs.append(h)
    access = fresh_logger("bench.full", hs[0])
    parent = fresh_logger("bench", hs[1], hs[2])
    access.propagate = True
    del parent
    sink2 = AccessLogSink(access, error_logger=None)
    out["sfmon AccessLogSink -> access.log+app.log+stdout"] = lambda i: sink2(records[i & 63])

    # 2b. the same files without stdout: configure_logging(stdout=False), errors.log too.
    files = []
    for name, level in (("access2.log", 0), ("app2.log", 0), ("errors2.log", logging.ERROR)):
        h = DailyRotatingFileHandler(tmp / name, level=level)
        h.setFormatter(fmt)
        h.addFilter(ctx)
        files.append(h)
    access2 = fresh_logger("bench2.access", files[0])
    fresh_logger("bench2", *files[1:])
    access2.propagate = True
    sink2b = AccessLogSink(access2, error_logger=None)
    out["sfmon AccessLogSink -> access.log+app.log (+errors.log), no stdout"] = lambda i: sink2b(
        records[i & 63]
    )

    # 3. sfmon sink through a foreign handler (slow path: a LogRecord per line).
    fh = logging.FileHandler(tmp / "slow.log")
    fh.setFormatter(JsonFormatter())
    sink3 = AccessLogSink(fresh_logger("bench.slow", fh), error_logger=None)
    out["sfmon AccessLogSink -> logging.FileHandler (LogRecord path)"] = lambda i: sink3(
        records[i & 63]
    )

    # 4. reference: python-json-logger through logging, one line per request.
    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rid", default=None)

    class Ctx(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.request_id = var.get()
            return True

    ph = logging.FileHandler(tmp / "pjl.log")
    ph.setFormatter(
        PjlJsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
    )
    ph.addFilter(Ctx())
    plog = fresh_logger("bench.pjl", ph)
    var.set("a1b2c3d4e5f60718293a4b5c6d7e8f90")

    def pjl_line(i: int) -> None:
        r = records[i & 63]
        plog.info(
            "Request completed: %s",
            r.status,
            extra={
                "method": r.method,
                "path": r.path,
                "route": r.route,
                "status": r.status,
                "content_length": r.content_length,
                "latency_ms": r.latency_ms,
                "user_id": r.user_id,
            },
        )

    out["reference: pjl JsonFormatter + logging.FileHandler, logger.info(extra=)"] = pjl_line

    # 5. an ordinary application record through sfmon's formatter and file.
    h5 = DailyRotatingFileHandler(tmp / "app5.log")
    h5.setFormatter(JsonFormatter())
    h5.addFilter(RequestContextFilter())
    alog = fresh_logger("bench.app", h5)
    current_request_id.set("a1b2c3d4e5f60718293a4b5c6d7e8f90")
    out["ordinary logger.info through sfmon JsonFormatter -> sfmon file"] = lambda i: alog.info(
        "charging card %s", i, extra={"amount_cents": 1200}
    )

    try:
        from concurrent_log_handler import ConcurrentTimedRotatingFileHandler
    except ImportError:
        pass
    else:
        ch = ConcurrentTimedRotatingFileHandler(str(tmp / "clh.log"), when="midnight")
        ch.setFormatter(JsonFormatter())
        sink6 = AccessLogSink(fresh_logger("bench.clh", ch), error_logger=None)
        out["sfmon AccessLogSink -> ConcurrentTimedRotatingFileHandler"] = lambda i: sink6(
            records[i & 63]
        )
    return out


def _mp_writer(kind: str, path: str, lines: int, interval: float, q: object) -> None:
    t0 = time.process_time()
    if kind == "sfmon LogFile":
        f = LogFile(path, rotate_interval_seconds=interval)
        for i in range(lines):
            f.write(b'{"proc":%d,"seq":%d,"pad":"%s"}\n' % (os.getpid(), i, b"x" * 150))
        f.close()
    else:
        from concurrent_log_handler import ConcurrentTimedRotatingFileHandler

        h = ConcurrentTimedRotatingFileHandler(path, when="S", interval=int(interval))
        h.setFormatter(logging.Formatter("%(message)s"))
        log = fresh_logger(f"mp{os.getpid()}", h)
        for i in range(lines):
            log.info('{"proc":%d,"seq":%d,"pad":"%s"}', os.getpid(), i, "x" * 150)
        h.close()
    q.put((time.process_time() - t0) / lines * 1e6)  # type: ignore[attr-defined]


def multiprocess(procs: int, lines: int) -> None:
    kinds = ["sfmon LogFile"]
    try:
        import concurrent_log_handler  # noqa: F401

        kinds.append("concurrent-log-handler timed")
    except ImportError:
        pass
    ctx = multiprocessing.get_context("fork")
    for kind in kinds:
        with tempfile.TemporaryDirectory() as d:
            q = ctx.Queue()
            t0 = time.perf_counter()
            ps = [
                ctx.Process(target=_mp_writer, args=(kind, f"{d}/mp.log", lines, 1, q))
                for _ in range(procs)
            ]
            for p in ps:
                p.start()
            cpu = [q.get() for _ in ps]
            for p in ps:
                p.join()
            wall = time.perf_counter() - t0
            total = 0
            for name in os.listdir(d):
                if name.startswith("mp.log"):
                    with open(f"{d}/{name}", "rb") as fh:
                        total += fh.read().count(b"\n")
            print(
                f"  {kind:32s} {procs}x{lines} lines, 1 s rotation: "
                f"{statistics.median(cpu):6.1f} CPU us/line/proc, wall {wall:5.2f} s, "
                f"lines found {total}/{procs * lines}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--procs", type=int, default=0, help="also run the multi-process test")
    ap.add_argument(
        "--cold", type=int, default=0, help="also time this many single lines with cold caches"
    )
    args = ap.parse_args()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.lines} lines x {args.repeats}"
    )
    print("CPU us per access line (median of repeats):")
    with tempfile.TemporaryDirectory() as d:
        fns = scenarios(Path(d))
        for fn in fns.values():
            fn(0)
        for name, us in measure(fns, args.lines, args.repeats).items():
            print(f"  {us:6.2f}  {name}")
        if args.cold:
            print(f"wall us per access line with cold caches (median of {args.cold}):")
            for name, us in measure_cold(fns, args.cold).items():
                print(f"  {us:6.2f}  {name}")
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith("bench"):
                fresh_logger(name)
    if args.procs:
        print("multi-process writers:")
        multiprocess(args.procs, args.lines)


if __name__ == "__main__":
    main()
