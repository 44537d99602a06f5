"""Probes and JSON reports: ``/health``, ``/ready``, ``/live``, ``/summary``, ``/errors``.

Checks run in a background thread with a timeout and a cached result, so a hung
check never hangs a probe. Figures in the reports are merged across all workers
through the store; system figures cover the gunicorn master and its live workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import readiness, store
from .endpoints import json_response

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .endpoints import Endpoints

__all__ = ["CheckResult", "CheckRunner", "install", "utc_now"]


def utc_now() -> str:
    """Now as UTC ISO 8601 with ``Z`` (second precision, as in the seed)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CheckResult:
    """The outcome of one check run."""

    __slots__ = ("checked_at", "duration_ms", "error", "ok")

    def __init__(self, ok: bool, error: str | None, duration_ms: float, checked_at: float):
        self.ok = ok
        self.error = error
        self.duration_ms = duration_ms
        self.checked_at = checked_at

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "pass" if self.ok else "fail",
            "duration_ms": round(self.duration_ms, 2),
            "checked_at": datetime.fromtimestamp(self.checked_at, timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }
        if self.error:
            out["error"] = self.error
        return out


class _Check:
    def __init__(self, name: str, fn: Callable[[], object]) -> None:
        self.name = name
        self.fn = fn
        self.result: CheckResult | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            value = self.fn()
            ok, error = value is not False, None if value is not False else "check returned False"
        except Exception as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"[:300]
        self.result = CheckResult(ok, error, (time.perf_counter() - started) * 1000, time.time())


class CheckRunner:
    """Runs named checks with a timeout, caching each result for *ttl* seconds.

    A check still running after *timeout* counts as failed; it is not started again
    until it returns, so a hung dependency costs one thread, not one per probe.

    .. code-block:: python

        runner = CheckRunner({"database": sqlite_check("app.db")}, timeout=2, ttl=5)
        ok, results = runner.run()
    """

    def __init__(
        self, checks: Mapping[str, Callable[[], object]], *, timeout: float, ttl: float
    ) -> None:
        self.checks = {name: _Check(name, fn) for name, fn in checks.items()}
        self.timeout = timeout
        self.ttl = ttl

    def run(self) -> tuple[bool, dict[str, CheckResult]]:
        """Return ``(all passed, results)``, running checks whose cache expired."""
        now = time.time()
        started: list[_Check] = []
        for check in self.checks.values():
            with check.lock:
                fresh = check.result is not None and now - check.result.checked_at < self.ttl
                running = check.thread is not None and check.thread.is_alive()
                if not fresh and not running:
                    check.thread = threading.Thread(
                        target=check._run, name=f"sfmon-check-{check.name}", daemon=True
                    )
                    check.thread.start()
                    started.append(check)
        deadline = time.monotonic() + self.timeout
        results: dict[str, CheckResult] = {}
        for check in self.checks.values():
            thread = check.thread
            if thread is not None and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread is not None and thread.is_alive():
                results[check.name] = CheckResult(
                    False, f"timed out after {self.timeout:g}s", self.timeout * 1000, now
                )
            else:
                result = check.result
                assert result is not None
                results[check.name] = result
        return all(r.ok for r in results.values()), results


def human_duration(seconds: float) -> str:
    """``3600`` → ``"1h 0m 0s"`` (days shown when non-zero)."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours}h {minutes}m {s}s"
    return f"{days}d {text}" if days else text


class Health:
    """The probe handlers and the health-derived metric families of one Monitor."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        settings = endpoints.monitor.settings
        self.settings = settings
        self.runner = CheckRunner(
            settings.checks, timeout=settings.check_timeout, ttl=settings.check_ttl
        )

    def uptime(self) -> float:
        return max(0.0, time.time() - self.endpoints.service_start_time())

    def health(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        ok, results = self.runner.run()
        db = results.get("database")
        body = {
            "status": "healthy" if ok else "degraded",
            "timestamp": utc_now(),
            "uptime_seconds": int(self.uptime()),
            "database": "unknown" if db is None else ("healthy" if db.ok else "unhealthy"),
            "api": "ok",
            "checks": {name: r.as_dict() for name, r in results.items()},
        }
        return json_response(
            start_response, "200 OK" if ok else "503 Service Unavailable", body, environ
        )

    def ready(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        directory = store.store_directory()
        _ok, results = self.runner.run()
        reasons = [f"check {name} failed" for name, r in results.items() if not r.ok]
        if not readiness.is_started(directory):
            reasons.append("starting")
        if readiness.is_draining(directory):
            reasons.append("draining")
        body: dict[str, Any] = {"ready": not reasons, "timestamp": utc_now()}
        if reasons:
            body["reasons"] = reasons
        return json_response(
            start_response, "503 Service Unavailable" if reasons else "200 OK", body, environ
        )

    def live(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return json_response(
            start_response,
            "200 OK",
            {"alive": True, "timestamp": utc_now(), "pid": os.getpid()},
            environ,
        )

    def metrics(self) -> Iterator[Metric]:
        """``<ns>_up`` and ``<ns>_database_status`` from the (cached) checks."""
        ns = self.settings.namespace
        ok, results = self.runner.run()
        yield GaugeMetricFamily(
            f"{ns}_up", "Application health status (1=healthy)", value=1 if ok else 0
        )
        db = results.get("database")
        if db is not None:
            yield GaugeMetricFamily(
                f"{ns}_database_status",
                "Database health (1=healthy, 0=unhealthy)",
                value=1 if db.ok else 0,
            )


def install(endpoints: Endpoints) -> None:
    """Register the probes and reports on *endpoints*, and their metric families."""
    from .reports import Reports

    health = Health(endpoints)
    endpoints.health = health  # type: ignore[attr-defined]
    endpoints.add("health", health.health)
    endpoints.add("ready", health.ready)
    endpoints.add("live", health.live)
    reports = Reports(endpoints, health)
    endpoints.add("summary", reports.summary, protected=True)
    endpoints.add("errors", reports.errors, protected=True)
    endpoints.extra_collectors.extend([health.metrics, reports.metrics])
