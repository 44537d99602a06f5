"""The built-in endpoints under the prefix (``/api/metrics`` by default).

Each is a small WSGI app answered by whichever worker receives the request, with
figures merged across all workers through the store. ``/prometheus`` serves the
exposition; the probes and JSON reports live in :mod:`sfmon.health`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import __version__, store
from .exposition import StoreCollector, build_registry, render

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .middleware import _MonitorLogic as Monitor

__all__ = ["Endpoints", "json_response"]

Handler = Callable[["WSGIEnvironment", "StartResponse"], Iterable[bytes]]


def json_response(
    start_response: StartResponse, status: str, data: object, environ: WSGIEnvironment
) -> list[bytes]:
    """Send *data* as a JSON body (empty for HEAD)."""
    import json

    body = json.dumps(data, default=str).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _get_only(handler: Handler) -> Handler:
    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            body = b'{"error": "method not allowed"}'
            start_response(
                "405 Method Not Allowed",
                [
                    ("Allow", "GET, HEAD"),
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        return handler(environ, start_response)

    return guarded


class Endpoints:
    """Maps paths under the prefix to handlers; built once per :class:`Monitor`."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.prefix = monitor.settings.prefix + "/"
        self._collector: StoreCollector | None = None
        self._registry: Any = None
        self.started_at = time.time()
        self.extra_collectors: list[Callable[[], Iterable[Metric]]] = [self.service_metrics]
        self.handlers: dict[str, Handler] = {}
        self.add("prometheus", self.prometheus, protected=True)
        from .health import install as install_health

        install_health(self)

    def add(self, name: str, handler: Handler, *, protected: bool = False) -> None:
        """Serve *handler* at ``<prefix>/<name>`` (GET/HEAD only)."""
        if protected:
            handler = self.protect(handler)
        self.handlers[self.prefix + name] = _get_only(handler)

    def protect(self, handler: Handler) -> Handler:
        """Wrap *handler* with the token / allow-list check (when configured)."""
        from .protect import guard

        return guard(self.monitor.settings, handler)

    def lookup(self, path: str) -> Handler | None:
        return self.handlers.get(path.rstrip("/") if len(path) > 1 else path)

    # -- /prometheus -----------------------------------------------------------------

    def collector(self) -> StoreCollector:
        """The store collector of this process (created on first use)."""
        if self._collector is None:
            self._collector = StoreCollector(store.store_directory(), self.extra_collectors)
            self._registry = build_registry(self._collector)
        return self._collector

    def prometheus(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        collector = self.collector()

        def protobuf() -> bytes:
            from .protobuf_exposition import protobuf_body

            return protobuf_body(self._registry, collector, self.service_start_time())

        body, headers = render(
            self._registry,
            environ.get("HTTP_ACCEPT"),
            environ.get("HTTP_ACCEPT_ENCODING"),
            protobuf=protobuf,
        )
        start_response("200 OK", headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def service_start_time(self) -> float:
        directory = store.store_directory()
        meta = store.read_service_meta(directory)
        return float(meta.get("start_time", self.started_at))

    def service_metrics(self) -> Iterator[Metric]:
        """Start time, uptime, build and config info, computed at scrape time."""
        s = self.monitor.settings
        ns = s.namespace
        start = self.service_start_time()
        yield GaugeMetricFamily(
            f"{ns}_start_time_seconds", "Service (gunicorn master) start, Unix time", value=start
        )
        yield GaugeMetricFamily(
            f"{ns}_uptime_seconds", "Seconds since the service started", value=time.time() - start
        )
        info = GaugeMetricFamily(
            f"{ns}_build_info",
            "Build information (always 1)",
            labels=["version", "python_version", "sfmon_version"],
        )
        info.add_metric(
            [s.service_version or "unknown", platform.python_version(), __version__], 1
        )
        yield info
        config = GaugeMetricFamily(
            f"{ns}_config_info", "Hash of the monitor's configuration (always 1)", labels=["hash"]
        )
        config.add_metric([s.config_hash()], 1)
        yield config
        yield GaugeMetricFamily(
            "sfmon_scrape_worker_pid",
            "PID of the worker that answered this scrape",
            value=os.getpid(),
        )
