"""The variants every benchmark measures: one trivial WSGI app and one Flask app, bare and
instrumented by sfmon or by a peer.

A variant builds a WSGI app from a :class:`Context` (the temporary directories of one
run). ``activate()`` switches process-wide state (sfmon's logging configuration) to the
variant's before it is measured, so variants can be interleaved in one process. Peer
variants whose packages are missing are skipped (``missing()`` names the module).

``gunicorn_app()`` is the gunicorn entry point: ``peers:gunicorn_app()`` with
``BENCH_VARIANT`` (a variant key) and ``BENCH_DIR`` (the run's temporary directory).

The floors record constant labels: they are the cost of recording (and of writing one
log line), not of finding out what to record (route, status, request id).
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

App = Callable[..., Any]
ROUTE = "/api/items/<int:item_id>"
PATH = "/api/items/7"


class Context:
    """Where one run keeps its files: ``<dir>/mp`` is ``PROMETHEUS_MULTIPROC_DIR``."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.mp = os.path.join(directory, "mp")
        os.makedirs(self.mp, exist_ok=True)

    def logs(self, key: str) -> str:
        path = os.path.join(self.dir, "logs", key.replace("/", "-"))
        os.makedirs(path, exist_ok=True)
        return path


def prepare_environment(directory: str) -> Context:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported (it decides
    multiprocess mode at import time) and return the run's context."""
    ctx = Context(directory)
    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set"
        )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = ctx.mp
    return ctx


# -- the two apps -----------------------------------------------------------------------


def trivial(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The floor: the smallest WSGI app (it names its route template, as any app may)."""
    environ["sfmon.route"] = ROUTE
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def flask_app() -> Any:
    """A minimal Flask app with one route, ``/api/items/<int:item_id>``."""
    from flask import Flask

    app = Flask("bench")

    @app.get(ROUTE)
    def item(item_id: int) -> str:
        return "ok"

    return app


def _base(base: str) -> tuple[App, Callable[[App], App]]:
    """(the WSGI callable to wrap, a function that installs the wrapper and returns the
    app to serve). Flask keeps ``app`` and wraps ``app.wsgi_app``, as users do."""
    if base == "trivial":
        return trivial, lambda wrapped: wrapped
    app = flask_app()

    def install(wrapped: App) -> App:
        app.wsgi_app = wrapped
        return app

    return app.wsgi_app, install


# -- prometheus_client floors -------------------------------------------------------------

_pc_metrics: dict[str, Any] = {}


def _pc_pair(suffix: str) -> tuple[Any, Any]:
    if suffix not in _pc_metrics:
        import prometheus_client

        _pc_metrics[suffix] = (
            prometheus_client.Counter(
                f"floor_{suffix}_requests", "requests", ["method", "path", "status"]
            ),
            prometheus_client.Histogram(
                f"floor_{suffix}_latency_seconds", "latency", ["method", "path"]
            ),
        )
    return _pc_metrics[suffix]


def pc_floor(inner: App, suffix: str, log: logging.Logger | None = None) -> App:
    """prometheus_client multiprocess Counter + Histogram by hand, optionally plus one
    python-json-logger line per request."""
    c, h = _pc_pair(suffix)
    perf = time.perf_counter
    rid: contextvars.ContextVar[str] = contextvars.ContextVar("bench_rid", default="-")

    if log is None:

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            t = perf()
            body = inner(environ, start_response)
            c.labels("GET", ROUTE, "200").inc()
            h.labels("GET", ROUTE).observe(perf() - t)
            return body

        return app

    def app_log(environ: dict[str, Any], start_response: Any) -> Any:
        t = perf()
        token = rid.set("a1b2c3d4e5f60718293a4b5c6d7e8f90")
        body = inner(environ, start_response)
        latency = perf() - t
        c.labels("GET", ROUTE, "200").inc()
        h.labels("GET", ROUTE).observe(latency)
        log.info(
            "Request completed: %s",
            200,
            extra={
                "request_id": rid.get(),
                "method": "GET",
                "path": PATH,
                "route": ROUTE,
                "status": 200,
                "latency_ms": round(latency * 1000, 3),
            },
        )
        rid.reset(token)
        return body

    return app_log


def pjl_logger(path: str, name: str) -> logging.Logger:
    """A logger writing python-json-logger lines to *path* (the logging floor's file)."""
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.FileHandler(path)
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
    )
    log = logging.getLogger(name)
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


# -- the variants ---------------------------------------------------------------------


@dataclass
class Variant:
    key: str  # "<base>/<kind>"
    label: str
    base: str  # "trivial" or "flask"
    build: Callable[[Context], App]
    needs: tuple[str, ...] = ()
    activate: Callable[[Context], None] = field(default=lambda ctx: None)
    gunicorn: bool = False  # also measured under gunicorn + wrk
    namespace: str | None = None  # sfmon's metric namespace, when it is sfmon

    def missing(self) -> str | None:
        """The first needed module that is not installed, else ``None``."""
        for mod in self.needs:
            try:
                found = importlib.util.find_spec(mod) is not None
            except ModuleNotFoundError:  # a dotted name whose parent is missing
                found = False
            if not found:
                return mod
        return None

    @property
    def bare_key(self) -> str:
        return f"{self.base}/bare"


def _bare(base: str) -> Callable[[Context], App]:
    def build(ctx: Context) -> App:
        inner, install = _base(base)
        return install(inner)

    return build


def _sfmon(base: str, ns: str, pure: bool = False, **options: Any) -> Callable[[Context], App]:
    def build(ctx: Context) -> App:
        import sfmon
        from sfmon.middleware import PureMonitor

        inner, install = _base(base)
        cls = PureMonitor if pure else sfmon.Monitor
        return install(cls(inner, namespace=ns, **options))

    return build


def _sfmon_logging(key: str, full: bool) -> Callable[[Context], None]:
    def activate(ctx: Context) -> None:
        import sfmon

        d = ctx.logs(key)
        if full:  # the default set: app.log (everything), access.log, errors.log
            sfmon.configure_logging(None, log_file="app.log", log_dir=d, stdout=False)
        else:
            sfmon.configure_logging(None, log_file=None, log_dir=d, stdout=False, error_log=None)

    return activate


def _pc(base: str, with_log: bool) -> Callable[[Context], App]:
    def build(ctx: Context) -> App:
        inner, install = _base(base)
        suffix = base + ("_log" if with_log else "")
        log = None
        if with_log:
            log = pjl_logger(
                os.path.join(ctx.logs(f"{base}/pc-log"), "access.log"), f"bench.pjl.{base}"
            )
        return install(pc_floor(inner, suffix, log))

    return build


def _pfe(ctx: Context) -> App:
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    app = flask_app()
    GunicornInternalPrometheusMetrics(app)
    return app


class _NullSpanExporter:
    """Drops finished spans (the cost measured is the SDK's, not an exporter's)."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _otel(base: str, tracer: bool) -> Callable[[Context], App]:
    def build(ctx: Context) -> App:
        from opentelemetry import trace
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        if tracer:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor

            tracer_provider: Any = TracerProvider()
            tracer_provider.add_span_processor(SimpleSpanProcessor(_NullSpanExporter()))  # type: ignore[arg-type]
        else:
            tracer_provider = trace.NoOpTracerProvider()
        inner, install = _base(base)
        return install(
            OpenTelemetryMiddleware(
                inner, tracer_provider=tracer_provider, meter_provider=meter_provider
            )
        )

    return build


_OTEL = ("opentelemetry.instrumentation.wsgi", "opentelemetry.sdk")


def variants() -> list[Variant]:
    """Every variant, trivial app first; the first of each base is its bare app."""
    out: list[Variant] = []
    for base in ("trivial", "flask"):
        flask_need: tuple[str, ...] = ("flask",) if base == "flask" else ()
        b = "T" if base == "trivial" else "F"
        out.append(
            Variant(
                f"{base}/bare",
                f"{base}: bare",
                base,
                _bare(base),
                flask_need,
                gunicorn=True,
            )
        )
        out.append(
            Variant(
                f"{base}/pc",
                f"{base}: prometheus_client floor",
                base,
                _pc(base, False),
                (*flask_need, "prometheus_client"),
                gunicorn=base == "trivial",
            )
        )
        out.append(
            Variant(
                f"{base}/pc-log",
                f"{base}: prometheus_client + pjl line floor",
                base,
                _pc(base, True),
                (*flask_need, "prometheus_client", "pythonjsonlogger"),
                gunicorn=True,
            )
        )
        if base == "flask":
            out.append(
                Variant(
                    "flask/pfe",
                    "flask: prometheus_flask_exporter (multiprocess)",
                    base,
                    _pfe,
                    ("flask", "prometheus_flask_exporter"),
                    gunicorn=True,
                )
            )
        out.append(
            Variant(
                f"{base}/otel",
                f"{base}: OpenTelemetry WSGI, SDK meter",
                base,
                _otel(base, False),
                (*flask_need, *_OTEL),
                gunicorn=True,
            )
        )
        out.append(
            Variant(
                f"{base}/otel-trace",
                f"{base}: OpenTelemetry WSGI, SDK meter + tracer",
                base,
                _otel(base, True),
                (*flask_need, *_OTEL),
                gunicorn=base == "flask",
            )
        )
        out.append(
            Variant(
                f"{base}/sfmon-classic",
                f"{base}: sfmon metrics, classic buckets only",
                base,
                _sfmon(base, f"b{b}classic", access_log=False, native_histograms=False),
                flask_need,
                namespace=f"b{b}classic",
            )
        )
        out.append(
            Variant(
                f"{base}/sfmon-pure",
                f"{base}: sfmon metrics, pure Python (no C speedups)",
                base,
                _sfmon(base, f"b{b}pure", pure=True, access_log=False),
                flask_need,
                namespace=f"b{b}pure",
            )
        )
        out.append(
            Variant(
                f"{base}/sfmon",
                f"{base}: sfmon metrics (+native buckets)",
                base,
                _sfmon(base, f"b{b}metrics", access_log=False),
                flask_need,
                gunicorn=True,
                namespace=f"b{b}metrics",
            )
        )
        out.append(
            Variant(
                f"{base}/sfmon-access",
                f"{base}: sfmon + access.log",
                base,
                _sfmon(base, f"b{b}access"),
                flask_need,
                activate=_sfmon_logging(f"{base}/sfmon-access", full=False),
                gunicorn=base == "trivial",
                namespace=f"b{b}access",
            )
        )
        out.append(
            Variant(
                f"{base}/sfmon-logs",
                f"{base}: sfmon + app/access/errors.log",
                base,
                _sfmon(base, f"b{b}logs"),
                flask_need,
                activate=_sfmon_logging(f"{base}/sfmon-logs", full=True),
                gunicorn=True,
                namespace=f"b{b}logs",
            )
        )
    return out


def by_key() -> dict[str, Variant]:
    return {v.key: v for v in variants()}


def select(keys: str | None, *, gunicorn: bool = False) -> list[Variant]:
    """Variants named in comma-separated *keys* (all when ``None``; ``gunicorn``: the
    default gunicorn subset), without those whose packages are missing."""
    pool = variants()
    if keys:
        wanted = keys.split(",")
        pool = [v for v in pool if v.key in wanted or v.base in wanted]
    elif gunicorn:
        pool = [v for v in pool if v.gunicorn]
    return pool


def counted(variant: Variant, ctx: Context, store_dir: str | None = None) -> dict[str, int] | None:
    """What the variant's own store says was served: requests (counter) and the latency
    histogram's count, merged across processes; plus access-log lines for sfmon's logging
    variants. ``None`` for variants without a multiprocess store."""
    if variant.namespace is not None:
        from sfmon import store
        from sfmon.merge import StoreReader

        snap = StoreReader(store_dir or store.store_directory()).snapshot()
        ns = variant.namespace
        fams = snap.families
        req = fams.get(f"{ns}_requests_total")
        hist = fams.get(f"{ns}_request_latency_ms")
        out = {
            "requests": round(sum(req.series.values()) / store.VALUE_SCALE) if req else 0,
            "histogram": sum(h.count for h in hist.series.values()) if hist else 0,
        }
        if variant.key.endswith(("sfmon-access", "sfmon-logs")):
            access = os.path.join(ctx.logs(variant.key), "access.log")
            with open(access, "rb") as f:
                out["access_lines"] = f.read().count(b"\n")
        return out
    kind = variant.key.split("/")[1]
    if kind in ("pc", "pc-log", "pfe"):
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry()
        MultiProcessCollector(reg, ctx.mp)
        if kind == "pfe":
            names = ("flask_http_request_total", "flask_http_request_duration_seconds_count")
        else:
            suffix = variant.base + ("_log" if kind == "pc-log" else "")
            names = (f"floor_{suffix}_requests_total", f"floor_{suffix}_latency_seconds_count")
        totals = [0.0, 0.0]
        for fam in reg.collect():
            for sample in fam.samples:
                for i, name in enumerate(names):
                    if sample.name == name:
                        totals[i] += sample.value
        return {"requests": round(totals[0]), "histogram": round(totals[1])}
    return None


def gunicorn_app() -> App:
    """gunicorn's app factory (``peers:gunicorn_app()``): the ``BENCH_VARIANT`` variant."""
    ctx = Context(os.environ["BENCH_DIR"])
    variant = by_key()[os.environ["BENCH_VARIANT"]]
    app = variant.build(ctx)
    variant.activate(ctx)
    return app


def drive(app: App, n: int, path: str = PATH) -> float:
    """CPU seconds to serve *n* requests the way a sync server does: call, iterate, close."""
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    environ["wsgi.multithread"] = False  # as gunicorn's sync worker says

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    clock = time.process_time
    t = clock()
    for _ in range(n):
        body = app(dict(environ), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return clock() - t


def has_gunicorn() -> bool:
    return importlib.util.find_spec("gunicorn") is not None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, Python, load average: printed next to every number."""
    import platform

    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loadavg": load_average(),
    }
