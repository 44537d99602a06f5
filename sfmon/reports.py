"""``/summary`` and ``/errors``, and the system, database and worker metric families.

Request figures come from the store merged across every worker; quantiles come from
the merged latency histograms (native buckets when present, else classic buckets).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import store, system
from .endpoints import json_response
from .merge import HistogramValue, Snapshot
from .recent_errors import RecentErrors
from .store import VALUE_SCALE

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .endpoints import Endpoints
    from .health import Health

__all__ = ["Reports", "quantile"]

MB = 1024.0 * 1024.0
_STAT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def quantile(hv: HistogramValue, q: float) -> float | None:
    """Estimate quantile *q* of a merged histogram (``None`` when empty).

    Native buckets are used when present (interpolated exponentially inside the
    bucket, as PromQL does); otherwise classic buckets, linearly.
    """
    total = hv.count
    if total == 0:
        return None
    rank = q * total
    if hv.schema is not None and hv.native and not any(k & 1 for k in hv.native):
        base = 2.0 ** (2.0**-hv.schema)
        acc = hv.zero_count
        if acc >= rank:
            return 0.0
        for key in sorted(hv.native):
            n = hv.native[key]
            if acc + n >= rank:
                idx = key >> 1
                lower, upper = base ** (idx - 1), base**idx
                return float(lower * (upper / lower) ** ((rank - acc) / n))
            acc += n
    lower, acc = 0.0, 0
    for bound, n in zip((*hv.bounds, math.inf), hv.buckets):
        if acc + n >= rank and n:
            if bound == math.inf:
                return lower
            return lower + (bound - lower) * (rank - acc) / n
        acc += n
        lower = bound
    return lower


class _Cached:
    """Calls *fn* in a thread with a timeout; keeps the last good value for *ttl*."""

    def __init__(self, fn: Callable[[], Mapping[str, float]], ttl: float, timeout: float):
        self.fn = fn
        self.ttl = ttl
        self.timeout = timeout
        self.value: dict[str, float] = {}
        self.error: str | None = None
        self.at = 0.0
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            raw = self.fn()
            self.value = {str(k): float(v) for k, v in dict(raw).items()}
            self.error = None
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]
        self.at = time.time()

    def get(self) -> tuple[dict[str, float], str | None]:
        if time.time() - self.at >= self.ttl and not (self.thread and self.thread.is_alive()):
            self.thread = threading.Thread(target=self._run, name="sfmon-stats", daemon=True)
            self.thread.start()
        if self.thread is not None:
            self.thread.join(self.timeout)
            if self.thread.is_alive() and not self.value:
                return {}, f"timed out after {self.timeout:g}s"
        return self.value, self.error


class Reports:
    """The JSON reports and scrape-time families of one Monitor."""

    def __init__(self, endpoints: Endpoints, health: Health) -> None:
        self.endpoints = endpoints
        self.health = health
        s = endpoints.monitor.settings
        self.ns = s.namespace
        self.stats = None if s.stats is None else _Cached(s.stats, s.stats_ttl, s.check_timeout)
        self.log_dir = str(s.log_dir) if s.log_dir else os.environ.get("SFMON_LOG_DIR", "logs")
        self._ring: RecentErrors | None = None

    @property
    def ring(self) -> RecentErrors:
        if self._ring is None:
            self._ring = RecentErrors(store.store_directory())
        return self._ring

    def _snapshot(self) -> Snapshot:
        return self.endpoints.collector().snapshot()

    def _request_totals(self, snap: Snapshot) -> tuple[float, float]:
        req = snap.families.get(f"{self.ns}_requests_total")
        err = snap.families.get(f"{self.ns}_errors_total")
        requests = sum(req.series.values()) / VALUE_SCALE if req else 0.0
        errors = sum(err.series.values()) / VALUE_SCALE if err else 0.0
        return requests, errors

    def _database(self) -> dict[str, Any]:
        _ok, results = self.health.runner.run()
        db = results.get("database")
        out: dict[str, Any] = {
            "status": "unknown" if db is None else ("healthy" if db.ok else "unhealthy"),
        }
        if self.stats is not None:
            stats, error = self.stats.get()
            out["stats"] = {k: (int(v) if float(v).is_integer() else v) for k, v in stats.items()}
            if error:
                out["stats_error"] = error
        return out

    def _endpoints(self, snap: Snapshot) -> list[dict[str, Any]]:
        lat = snap.families.get(f"{self.ns}_request_latency_ms")
        err = snap.families.get(f"{self.ns}_errors_total")
        errors: dict[tuple[str, str], float] = {}
        if err is not None:
            for (method, path, _status), v in err.series.items():
                errors[(method, path)] = errors.get((method, path), 0.0) + v / VALUE_SCALE
        rows = []
        if lat is not None:
            for (method, path), hv in lat.series.items():
                count = hv.count
                e = errors.get((method, path), 0.0)
                rows.append(
                    {
                        "method": method,
                        "path": path,
                        "count": count,
                        "errors": int(e),
                        "error_rate": round(100.0 * e / count, 2) if count else 0.0,
                        "avg_ms": round(hv.sum / count, 3) if count else None,
                        **{
                            f"p{int(q * 100)}_ms": _round(quantile(hv, q))
                            for q in (0.5, 0.95, 0.99)
                        },
                    }
                )
        rows.sort(key=lambda r: r["p95_ms"] or 0.0, reverse=True)
        return rows

    def _workers(
        self, snap: Snapshot, figures: list[system.ProcessFigures]
    ) -> list[dict[str, Any]]:
        by_pid = {f.pid: f for f in figures}
        directory = store.store_directory()
        system.claim_slot(directory)  # this process, if no gunicorn hook claimed one
        totals_by_pid = dict(snap.workers)
        master = store.read_service_meta(directory).get("master_pid")
        pids = sorted(p for p in by_pid if p != master) or [os.getpid()]
        rows = []
        for pid in pids:
            totals = totals_by_pid.get(pid, {})
            fig = by_pid.get(pid)
            slot = system.slot_of(directory, pid)
            rows.append(
                {
                    "slot": slot,
                    "pid": pid,
                    "rss_mb": round(fig.rss / MB, 1) if fig else None,
                    "cpu_percent": round(fig.cpu_percent, 1) if fig else None,
                    "requests": int(totals.get(f"{self.ns}_requests_total", 0)),
                    "busy": totals.get(f"{self.ns}_requests_in_progress", 0) > 0,
                }
            )
        return rows

    def summary(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        from .health import human_duration, utc_now

        snap = self._snapshot()
        requests, errors = self._request_totals(snap)
        figures, cpu = system.snapshot()
        uptime = self.health.uptime()
        body = {
            "timestamp": utc_now(),
            "uptime": {"seconds": int(uptime), "human_readable": human_duration(uptime)},
            "system": {
                "cpu_percent": round(cpu, 1),
                "memory": {
                    "rss_mb": round(sum(f.rss for f in figures) / MB, 1),
                    "vms_mb": round(sum(f.vms for f in figures) / MB, 1),
                    "percent": round(sum(f.memory_percent for f in figures), 2),
                },
                "process_id": os.getpid(),
                "processes": len(figures),
            },
            "application": {
                "requests_total": int(requests),
                "errors_total": int(errors),
                "error_rate": round(100.0 * errors / requests, 2) if requests else 0.0,
            },
            "database": self._database(),
            "endpoints": self._endpoints(snap),
            "workers": self._workers(snap, figures),
        }
        return json_response(start_response, "200 OK", body, environ)

    def errors(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        from .health import utc_now

        snap = self._snapshot()
        requests, errors = self._request_totals(snap)
        by_status: dict[str, int] = {}
        by_endpoint: dict[str, int] = {}
        fam = snap.families.get(f"{self.ns}_errors_total")
        if fam is not None:
            for (method, path, status), v in fam.series.items():
                n = int(v / VALUE_SCALE)
                by_status[status] = by_status.get(status, 0) + n
                key = f"{method} {path}"
                by_endpoint[key] = by_endpoint.get(key, 0) + n
        recent = []
        for e in self.ring.read(50):
            recent.append(
                {
                    **e,
                    "time": time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(e.get("time", 0)))
                    ),
                }
            )
        body = {
            "timestamp": utc_now(),
            "requests_total": int(requests),
            "errors_total": int(errors),
            "error_rate_percent": round(100.0 * errors / requests, 2) if requests else 0.0,
            "by_status": dict(sorted(by_status.items())),
            "by_endpoint": dict(sorted(by_endpoint.items(), key=lambda kv: -kv[1])),
            "recent": recent,
            "answered_by": os.getpid(),
        }
        return json_response(start_response, "200 OK", body, environ)

    def metrics(self) -> Iterator[Metric]:
        """System, worker, database and disk families (computed at scrape time)."""
        ns = self.ns
        figures, cpu = system.snapshot()
        yield GaugeMetricFamily(
            f"{ns}_memory_rss_mb",
            "Resident set size in MB (service)",
            value=sum(f.rss for f in figures) / MB,
        )
        yield GaugeMetricFamily(
            f"{ns}_memory_percent",
            "Memory usage percentage (service)",
            value=sum(f.memory_percent for f in figures),
        )
        yield GaugeMetricFamily(
            f"{ns}_cpu_percent", "CPU usage percentage of the machine (service)", value=cpu
        )
        snap = self.endpoints.collector().last_snapshot
        if snap is not None:
            rows = self._workers(snap, figures)
            yield GaugeMetricFamily(f"{ns}_workers", "Live worker processes", value=len(rows))
            yield GaugeMetricFamily(
                f"{ns}_workers_busy",
                "Workers serving a request now",
                value=sum(1 for r in rows if r["busy"]),
            )
            rss = GaugeMetricFamily(
                f"{ns}_worker_memory_rss_bytes", "RSS per worker", labels=["worker"]
            )
            cpu_w = GaugeMetricFamily(
                f"{ns}_worker_cpu_percent",
                "CPU percent of one core, per worker",
                labels=["worker"],
            )
            served = GaugeMetricFamily(
                f"{ns}_worker_requests",
                "Requests served by the worker now in this slot",
                labels=["worker"],
            )
            busy = GaugeMetricFamily(
                f"{ns}_worker_busy", "1 if the worker is serving a request", labels=["worker"]
            )
            for r in rows:
                label = [str(r["slot"] if r["slot"] is not None else "none")]
                if r["rss_mb"] is not None:
                    rss.add_metric(label, r["rss_mb"] * MB)
                    cpu_w.add_metric(label, r["cpu_percent"])
                served.add_metric(label, r["requests"])
                busy.add_metric(label, 1 if r["busy"] else 0)
            yield from (rss, cpu_w, served, busy)
        if self.stats is not None:
            stats, _error = self.stats.get()
            for name, value in sorted(stats.items()):
                clean = _STAT_NAME.sub("_", name)
                yield GaugeMetricFamily(
                    f"{ns}_database_{clean}", f"Database statistic {name}", value=value
                )
        yield GaugeMetricFamily(
            f"{ns}_log_disk_free_ratio",
            "Free fraction of the log directory's filesystem",
            value=system.disk_free_ratio(os.path.abspath(self.log_dir)),
        )


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
