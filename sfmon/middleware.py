"""The WSGI middleware: time each request, tag it with a request id, record it.

The clock starts when :class:`Monitor` is called and stops when the server calls
``close()`` on the response, so streamed bodies count in full. Each finished request
updates the request metrics in the multiprocess store and becomes one
:class:`~sfmon.record.RequestRecord` for the sinks (the JSON access log is one).
Monitoring never changes a response: app exceptions are recorded and re-raised
unchanged, and sfmon's own failures are counted and swallowed.

The per-request path exists twice: in Python here (:class:`PureMonitor`,
:class:`_PyCall`) and in C (``sfmon/_speedups.c``), which :class:`Monitor` uses when it
was built. The C code handles the common case only (a sync worker, a request that ended
below 400 with its route known, ...) and calls the Python functions below for every
other case, so those stay the one reference; the tests run both on the same inputs.
"""

from __future__ import annotations

import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from . import metrics, native, routes, store
from ._accel import speedups
from .config import Settings
from .record import RequestRecord
from .request_id import (
    current_request_id,
    current_trace_id,
    new_request_id,
    parse_traceparent,
    resolve_request_id,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["Monitor", "PureMonitor"]

_SCALE = store.VALUE_SCALE
_perf = time.perf_counter
_NO_SLOTS = (-1, -1, -1)


class _MonitorLogic:
    """Wrap a WSGI app with request ids, request metrics, access logs and endpoints.

    :param app: any WSGI callable (a Flask app, ``app.wsgi_app``, Django's
        ``get_wsgi_application()``, ...).
    :param options: see the README's option table; each can also come from an
        ``SFMON_<OPTION>`` environment variable.
    :raises TypeError: *app* is not callable, or an option is unknown or mistyped.
    :raises ValueError: an option has a bad value.

    .. code-block:: python

        import sfmon
        app.wsgi_app = sfmon.Monitor(app.wsgi_app)
    """

    def __init__(self, app: WSGIApplication, **options: Any) -> None:
        if not callable(app):
            raise TypeError(f"Monitor needs a WSGI callable, got {type(app).__name__}")
        self.app = app
        self.settings = s = Settings.build(options)
        if s.multiproc_dir is not None:
            store.configure_directory(str(s.multiproc_dir))
        ns = s.namespace
        self.requests = metrics.counter(
            f"{ns}_requests_total",
            "Total HTTP requests completed",
            ["method", "path", "status"],
            max_series=s.max_series,
        )
        self.errors = metrics.counter(
            f"{ns}_errors_total",
            "Total HTTP requests that ended with status >= 400",
            ["method", "path", "status"],
            max_series=s.max_series,
        )
        self.latency = metrics.histogram(
            f"{ns}_request_latency_ms",
            "Request duration in milliseconds, from the call to the close of the body",
            ["method", "path"],
            buckets=s.buckets,
            native=s.native_histograms,
            native_schema=s.native_schema,
            native_max_buckets=s.native_max_buckets,
            max_series=s.max_series,
        )
        self.in_progress = metrics.gauge(
            f"{ns}_requests_in_progress",
            "Requests being served right now, summed over live workers",
            mode="livesum",
        )
        self.exceptions = metrics.counter(
            f"{ns}_exceptions_total",
            "Exceptions raised by the application, by type",
            ["type"],
            max_series=min(s.max_series, 100),
        )
        self._bounds = self.latency.bounds
        self._indexer = self.latency.indexer
        self._zero = self.latency.zero_threshold
        self._header = s.request_id_header
        self._header_lower = s.request_id_header.lower()
        self._header_env = "HTTP_" + s.request_id_header.upper().replace("-", "_")
        self._normaliser = s.route_normaliser or routes.normalise_path
        self._cache: dict[tuple[str, str, int], tuple[int, int, int]] = {}
        self._cache_limit = 4 * s.max_series
        self._writer: store.Writer | None = None
        self._inprog_slot = -1
        self._recent: Any = None
        self.sinks: list[Callable[[RequestRecord], Any]] = list(s.sinks)
        if s.access_log:
            from .access_log import AccessLogSink

            self.sinks.append(AccessLogSink())
        from .endpoints import Endpoints

        self.endpoints = Endpoints(self)
        self._prefix = self.endpoints.prefix
        from .adapters import flask as flask_adapter

        flask_adapter.install(app)
        arm = getattr(self, "_set_histogram", None)  # the C base class, when built
        if arm is not None:
            latency = self.latency
            schema = latency.native_schema if latency.indexer is not None else 0
            arm(
                latency.bounds,
                latency.indexer is not None,
                native._fractions(schema) if schema > 0 else (),
                schema,
                native.overflow_index(schema),
                latency.zero_threshold,
            )
            cast(Any, self)._fast = True

    #: The type of the object that follows one request (C or Python).
    _call_type: Any = None

    # -- the WSGI call ---------------------------------------------------------------

    def _call_py(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if "sfmon.monitor" in environ:
            # An outer Monitor already handles this request: never count it twice.
            return self.app(environ, start_response)
        started = _perf()
        environ["sfmon.monitor"] = self
        app = self.app
        counted = True
        if environ.get("PATH_INFO", "").startswith(self._prefix):
            handler = self.endpoints.lookup(environ["PATH_INFO"])
            if handler is not None:
                app = handler
                counted = self.settings.count_builtin_endpoints
        inbound = environ.get(self._header_env)
        if inbound is None:
            rid = new_request_id()
        else:
            rid, rejected = resolve_request_id(inbound)
            if rejected:
                self._safe(metrics.request_ids_rejected.inc)
        environ["sfmon.request_id"] = rid
        call: _PyCall = self._call_type(self, environ, start_response, rid, started, counted)
        tp = environ.get("HTTP_TRACEPARENT")
        if tp is not None:
            call.trace_id = parse_traceparent(tp)
            if call.trace_id is not None:
                call.token_tid = current_trace_id.set(call.trace_id)
        if counted:
            w = store._writer
            if (
                w is self._writer
                and w is not None
                and started <= w.check_at
                and not environ.get("wsgi.multithread", True)
            ):
                # The hot path of _enter (same writer, file checked within the second, a
                # sync worker: no lock), inline: a method call costs as much as the add.
                try:
                    w.d[self._inprog_slot] += 1.0
                    call.writer = w
                except Exception as exc:
                    metrics._report_store_failure(exc)
            else:
                self._enter(call, environ)
        try:
            call.body = app(environ, call.start_response)
        except BaseException:
            call.error = sys.exc_info()
            call.finish()
            raise
        return call

    # -- recording -------------------------------------------------------------------

    def _safe(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # metrics must never fail a request
            metrics._report_store_failure(exc)

    def _enter(self, call: _PyCall, environ: WSGIEnvironment) -> None:
        try:
            # The fork hook clears store._writer in a child, so no pid check is needed here.
            w = store._writer or store.get_writer()
            if w is not self._writer:
                self._cache = {}
                self._inprog_slot = w.series_slot(self.in_progress, ())
                self._writer = w
            if call.started > w.check_at:
                w.check(call.started)  # once a second: was the file deleted under us?
            # PEP 3333: without wsgi.multithread no other thread of this process serves
            # requests, so the request slots need no lock.
            if environ.get("wsgi.multithread", True):
                call.lock = w.lock
                with w.lock:
                    w.d[self._inprog_slot] += 1.0
            else:
                w.d[self._inprog_slot] += 1.0
            call.writer = w
        except Exception as exc:
            metrics._report_store_failure(exc)

    def note_error(
        self, request_id: str, method: str, route: str, status: int, exc_name: str | None
    ) -> None:
        """Count the exception type and add the request to the shared recent-errors list."""
        if exc_name is not None:
            self.exceptions.labels(exc_name).inc()
        if self._recent is None:
            from .recent_errors import RecentErrors

            self._recent = RecentErrors(store.store_directory())
        self._recent.add(
            request_id=request_id, method=method, route=route, status=status, exception=exc_name
        )

    def _slots(self, w: store.Writer, key: tuple[str, str, int]) -> tuple[int, int, int]:
        method, route, status = key
        labels = (method, route, str(status))
        req = w.series_slot(self.requests, labels)
        err = w.series_slot(self.errors, labels) if status >= 400 else -1
        hist = w.series_slot(self.latency, (method, route))
        if len(self._cache) >= self._cache_limit:
            self._cache = {}
        entry = self._cache[key] = (req, err, hist)
        return entry

    def record(
        self, call: _PyCall, method: str, route: str, status: int, latency_ms: float
    ) -> None:
        """Add one finished request to the store (hot path: a few slot adds)."""
        w = call.writer
        if w is None or w is not self._writer:
            return
        key = (method, route, status)
        slots = self._cache.get(key) or self._slots(w, key)
        req, err, hist = slots
        bucket = bisect_left(self._bounds, latency_ms)
        block = -1
        indexer = self._indexer
        if indexer is not None and latency_ms > self._zero:
            idx = indexer(latency_ms)
            block = w.blocks.get((hist, 1, idx >> 4), -1)
            if block < 0:
                block = w.block_slot(hist, 1, idx >> 4)
            block += idx & 15
        lock = call.lock
        if lock is not None:
            lock.acquire()
        try:
            q = w.q
            q[req] += _SCALE
            if err >= 0:
                q[err] += _SCALE
            q[hist] += round(latency_ms * _SCALE)
            q[hist + 2 + bucket] += 1
            if block >= 0:
                q[block] += 1
            elif indexer is not None:
                q[hist + 1] += 1
            w.d[self._inprog_slot] -= 1.0
        finally:
            if lock is not None:
                lock.release()


_STANDARD_METHODS = routes.STANDARD_METHODS


class _PyCall:
    """One request in flight: wraps ``start_response`` and the body; ``close()`` ends it.

    The body is passed through unbuffered; a list body is handed to the server as is.
    """

    __slots__ = (
        "_start_response",
        "_write",
        "body",
        "counted",
        "environ",
        "error",
        "exhausted",
        "finished",
        "iterating",
        "lock",
        "monitor",
        "nbytes",
        "request_id",
        "started",
        "status",
        "token_rid",
        "token_tid",
        "trace_id",
        "ttfb",
        "writer",
    )

    def __init__(
        self,
        monitor: Monitor,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        rid: str,
        started: float,
        counted: bool,
    ) -> None:
        self.monitor = monitor
        self.environ = environ
        self._start_response = start_response
        self.request_id = rid
        self.started = started
        self.counted = counted
        self.status = 0
        self.error: OptExcInfo | None = None
        self.exhausted = False
        self.iterating = False
        self.finished = False
        self.nbytes = 0
        self.ttfb: float | None = None
        self.writer: store.Writer | None = None
        self.lock: Any = None
        self.trace_id: str | None = None
        self.token_tid: Any = None
        self.body: Iterable[bytes] = ()
        self.token_rid = current_request_id.set(rid)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        try:
            self.status = _STATUS_CODES[status]  # apps use a handful of status lines
        except (KeyError, TypeError):
            self.status = _status_code(status)
        monitor = self.monitor
        headers = _with_request_id(
            headers, monitor._header_lower, monitor._header, self.request_id
        )
        self._write = self._start_response(status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> object:
        """The legacy ``write()`` callable, counted like body chunks."""
        if data and self.ttfb is None:
            self.ttfb = _perf()
        try:
            self.nbytes += len(data)
        except TypeError:
            pass
        return self._write(data)

    def __iter__(self) -> Iterator[bytes]:
        body = self.body
        if type(body) is list:
            try:
                self.nbytes += len(body[0]) if len(body) == 1 else sum(map(len, body))
            except TypeError:
                pass
            self.exhausted = True
            return iter(body)
        return self._stream(body)

    def _stream(self, body: Iterable[bytes]) -> Iterator[bytes]:
        self.iterating = True
        try:
            for chunk in body:
                if chunk and self.ttfb is None:
                    self.ttfb = _perf()
                try:
                    self.nbytes += len(chunk)
                except TypeError:
                    pass
                yield chunk
        except GeneratorExit:
            raise
        except BaseException:
            self.error = sys.exc_info()
            raise
        self.exhausted = True

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        except BaseException:
            if self.error is None:
                self.error = sys.exc_info()
            raise
        finally:
            self.finish()

    def finish(self) -> None:
        _finish(self)


def _finish(call: _PyCall) -> None:
    """End *call* once: record it, hand it to the sinks, reset the context."""
    if call.finished:
        return
    call.finished = True
    latency_ms = (_perf() - call.started) * 1000.0
    monitor = call.monitor
    environ = call.environ
    status = call.status
    exc_name = None
    if call.error is not None:
        status = 500
        exc_name = call.error[0].__name__ if call.error[0] else None
    elif call.iterating and not call.exhausted:
        status = 499  # the server stopped reading the body: the client went away
    elif status == 0:
        status = 500  # the app returned without ever calling start_response
    if exc_name is None and status >= 500:
        # A framework that turns exceptions into 500s itself (Flask) names the type
        # here through its adapter.
        handled = environ.get("sfmon.exception")
        if type(handled) is str:
            exc_name = handled[:100]
    method = environ.get("REQUEST_METHOD", "")
    try:
        method_label = method if method in _STANDARD_METHODS else routes.OTHER_METHOD
        route = environ.get("sfmon.route")
        if type(route) is not str or not route or len(route) > 200:
            route = routes.route_label(
                route, environ.get("PATH_INFO", ""), status, normaliser=monitor._normaliser
            )
    except Exception:
        method_label, route = routes.OTHER_METHOD, routes.UNMATCHED
    try:
        if call.counted:
            monitor.record(call, method_label, route, status, latency_ms)
            if status >= 400:
                monitor.note_error(call.request_id, method_label, route, status, exc_name)
    except Exception as exc:
        metrics._report_store_failure(exc)
    try:
        if call.counted and monitor.sinks:
            _sinks(call, method, method_label, route, status, latency_ms, exc_name)
    finally:
        try:
            current_request_id.reset(call.token_rid)
        except ValueError:  # closed from another context (a different thread or task)
            current_request_id.set(None)
        if call.token_tid is not None:
            _reset(current_trace_id, call.token_tid)
        call.environ = {}  # drop references to the request


def _with_request_id(
    headers: list[tuple[str, str]], lower: str, name: str, rid: str
) -> list[tuple[str, str]]:
    """*headers* plus ``(name, rid)``, without any header of that name the app set.

    Exactly one X-Request-Id, ours; the app's list is never mutated. Malformed headers
    go to the server untouched (it will report them).
    """
    size = len(lower)
    try:
        # Comparing lengths first keeps the common case (no such header) cheap.
        for key, _ in headers:
            if len(key) == size and key.lower() == lower:
                headers = [h for h in headers if h[0].lower() != lower]
                break
        return [*headers, (name, rid)]
    except Exception:
        return headers


def _sinks(
    call: _PyCall,
    method: str,
    method_label: str,
    route: str,
    status: int,
    latency_ms: float,
    exc_name: str | None,
) -> None:
    """Hand the finished *call* to every sink; a failing sink is reported, never raised."""
    try:
        record = _record(call, method, method_label, route, status, latency_ms, exc_name)
    except Exception as exc:  # never into the server, whatever the app left in environ
        _sink_failed(call.monitor.sinks, exc)
        return
    for sink in call.monitor.sinks:
        try:
            sink(record)
        except Exception as exc:
            _sink_failed(sink, exc)


def _record(
    call: _PyCall,
    method: str,
    method_label: str,
    route: str,
    status: int,
    latency_ms: float,
    exc_name: str | None,
) -> RequestRecord:
    environ = call.environ
    user = environ.get("sfmon.user_id") or environ.get("REMOTE_USER")
    script = environ.get("SCRIPT_NAME", "")
    path = environ.get("PATH_INFO", "")
    if type(script) is not str or type(path) is not str:
        script, path = _text(script), _text(path)
    ttfb = call.ttfb
    # Positional: keyword arguments cost twice as much on this per-request path.
    # Order: request_id, trace_id, method, method_label, path, route, status,
    # content_length, latency_ms, ttfb_ms, started_at, user_id, client_addr,
    # exception, exc_info.
    return RequestRecord(
        call.request_id,
        call.trace_id,
        method,
        method_label,
        script + path,
        route,
        status,
        call.nbytes,
        latency_ms,
        None if ttfb is None else (ttfb - call.started) * 1000.0,
        time.time() - latency_ms / 1000.0,
        None if user is None else user if type(user) is str else _text(user),
        environ.get("REMOTE_ADDR"),
        exc_name,
        call.error,  # type: ignore[arg-type]
    )


_STATUS_CODES: dict[str, int] = {}


def _status_code(status: object) -> int:
    """The code of a status line; an invalid one (" 20", "-1 x") is refused by the
    server, so it counts as 500. Remembers up to 256 distinct ``str`` lines."""
    try:
        code = int(status[:3])  # type: ignore[index]
    except (TypeError, ValueError):
        code = 500
    code = code if 100 <= code <= 999 else 500
    if type(status) is str and len(_STATUS_CODES) < 256:
        _STATUS_CODES[status] = code
    return code


def _text(value: object) -> str:
    # The app may leave anything in environ (a dispatcher's None, a lazy user object).
    if type(value) is str:
        return value
    try:
        return "" if value is None else str(value)
    except Exception:
        return "<unprintable>"


_failed_sinks: set[int] = set()


def _sink_failed(sink: object, exc: BaseException) -> None:
    if id(sink) not in _failed_sinks:
        _failed_sinks.add(id(sink))
        print(f"sfmon: sink {sink!r} failed: {exc!r}", file=sys.stderr)


def _reset(var: Any, token: Any) -> None:
    try:
        var.reset(token)
    except ValueError:
        var.set(None)  # closed from another context (a different thread or task)


def _store_failed(exc: BaseException) -> None:
    metrics._report_store_failure(exc)


class PureMonitor(_MonitorLogic):
    """:class:`Monitor` in pure Python, whether or not the C speedups were built.

    Same options and behaviour; :class:`Monitor` is this class when the speedups are
    missing or ``SFMON_SPEEDUPS=0``.
    """

    _call_type = _PyCall
    __call__ = _MonitorLogic._call_py


if speedups is not None:
    speedups.setup(
        finish=_finish,
        sinks=_sinks,
        status_code=_status_code,
        status_codes=_STATUS_CODES,
        fix_headers=_with_request_id,
        store_failure=_store_failed,
        store_dict=store.__dict__,
        request_id_var=current_request_id,
        trace_id_var=current_trace_id,
        methods=routes.STANDARD_METHODS,
        other_method=routes.OTHER_METHOD,
        record_type=RequestRecord,
        sink_failed=_sink_failed,
    )

    class Monitor(_MonitorLogic, speedups.MonitorBase):  # type: ignore[misc,name-defined]
        __doc__ = _MonitorLogic.__doc__
        _call_type = cast(Any, speedups).Call

else:
    Monitor = PureMonitor  # type: ignore[misc,assignment]
