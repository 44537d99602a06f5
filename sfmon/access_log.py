"""The access-log sink: one JSON line per finished request, and the traceback of a failed one.

The middleware calls the sink once per request with a :class:`~sfmon.record.RequestRecord`;
the line goes through the handlers of the ``sfmon.access`` logger (and its parents), with
sfmon's own handlers written directly, without building a ``logging.LogRecord``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

from . import logfiles as _logfiles
from .logfiles import (
    DailyRotatingFileHandler,
    LogFile,
    _WatchedHandler,
    record_write_failure,
    write_all,
)
from .logs import (
    ACCESS_LOGGER,
    ERROR_LOGGER,
    JsonFormatter,
    RequestContextFilter,
    format_timestamp,
)
from .record import RequestRecord

__all__ = ["AccessLogSink"]

_esc: Callable[[str], str] = encode_basestring_ascii
_OPTIONAL = ("trace_id", "ttfb_ms", "client_addr", "exception")

_TRUNCATED = "...[truncated]"
# Keys of the access line that a LogRecord carries itself (the slow path).
_RECORD_OWN = frozenset(("timestamp", "level", "logger", "message"))


def _cap(value: Any, limit: int) -> Any:
    """*value* as a string of at most *limit* characters (None stays None)."""
    if value is None:
        return None
    if type(value) is not str:
        try:
            value = str(value)
        except Exception:
            return "<unprintable>"
    if len(value) <= limit:
        return value
    return value[: max(limit - len(_TRUNCATED), 0)] + _TRUNCATED


def _number(value: Any) -> float | None:
    """*value* (ms) rounded to the µs, half up; None for NaN and infinities (not JSON)."""
    number = float(value)
    if -1e15 < number < 1e15:
        # As the fast path rounds (int(x * 1000 + 0.5)); n / 1000 is the float the
        # line's "n // 1000 . n % 1000" text parses back to.
        return math.floor(number * 1000 + 0.5) / 1000
    return number if math.isfinite(number) else None


def _js(value: Any, limit: int) -> str:
    """*value* capped and JSON-encoded (``null`` for None)."""
    return "null" if value is None else _esc(_cap(value, limit))


def _num(value: Any) -> str:
    """JSON for a latency: ms rounded to µs (same float as ``_number``), or ``null``."""
    if value is None:
        return "null"
    number = _number(value)
    return "null" if number is None else float.__repr__(number)


# Method to the line's text from the method's key to the path's key.
_METHODS = {
    m: f',"method":"{m}","path":'
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}
# Table lookups instead of formatting: the timestamp's milliseconds and closing quote,
# and the fraction of a latency in ms (its µs). Formatting a float costs several times
# more than integer arithmetic and an index, above all with the cold caches of a server.
_MS = tuple(f'{n:03d}Z"' for n in range(1000))
_FRAC = tuple(f".{n:03d}" for n in range(1000))


def _decode_path(path: str) -> str:
    # PEP 3333 hands PATH_INFO over as bytes decoded as latin-1; undo that so UTF-8
    # paths read naturally. Invalid UTF-8 becomes \xNN text, surrogateescape'd bytes
    # count as bytes; a path with other characters above U+00FF was decoded already and
    # is kept as it is (JSON-escaped).
    try:
        return path.encode("latin-1", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path


class _Route:
    """Where the access lines of one level go (what ``Logger.callHandlers`` would do)."""

    __slots__ = ("files", "others", "records", "writers")

    def __init__(self) -> None:
        # sfmon's files, grouped by what follows the line's last key (static fields,
        # "}\n"): the line is encoded once per group and written with one call.
        self.files: tuple[tuple[str, tuple[LogFile, ...]], ...] = ()
        self.writers: list[tuple[Callable[[str], None], str]] = []  # other write_json_line
        self.records: list[logging.Handler] = []  # handlers that need a LogRecord
        self.others = False  # writers or records


class _Plan:
    """The handlers an access line goes to, worked out once from the logging tree.

    Built from the loggers ``Logger.callHandlers`` would visit from *logger* (its
    parents while ``propagate``), and kept with what it was built from: those loggers'
    handler lists (copies), ``propagate`` and ``parent``, the logger's filters, and the
    level, formatter and filters of the handlers that take the ready line (sfmon's own
    handlers count their changes instead: ``logfiles.handler_changes``). :meth:`current`
    compares them before every line, so a handler added, removed or changed
    (``addHandler``, ``setLevel``, ``setFormatter``, ``addFilter``, dictConfig, assigned
    attributes, in-place list edits) is obeyed from the next line on. Logger levels and
    ``logging.disable`` are read by ``isEnabledFor`` for every line. Handlers that need
    a ``LogRecord`` check their own level and filters per line, as usual.
    """

    __slots__ = (
        *("changes", "error", "filters", "first", "first_state", "info", "last_resort"),
        *("logger", "others", "rest", "second", "second_state"),
    )

    def __init__(self, logger: logging.Logger) -> None:
        self.changes = _logfiles.handler_changes  # read first: a change after it is seen
        self.logger = logger
        self.filters = list(logger.filters)  # non-empty: every line takes logger.handle
        chain: list[tuple[logging.Logger, tuple[Any, ...]]] = []
        handlers: list[logging.Handler] = []
        current: logging.Logger | None = logger
        while current is not None:
            own = list(current.handlers)
            chain.append((current, (own, current.propagate, current.parent)))
            handlers += own
            current = current.parent if current.propagate else None
        # The usual chain (sfmon.access, root) is compared without a loop: each logger in
        # its own expression, one tuple comparison each (several times cheaper).
        self.first: logging.Logger = chain[0][0]
        self.first_state: tuple[Any, ...] = (*chain[0][1], self.filters)
        self.second: logging.Logger | None = None
        self.second_state: tuple[Any, ...] = ()
        if len(chain) > 1:
            self.second, self.second_state = chain[1]
        self.rest = tuple(chain[2:])
        self.last_resort = not handlers  # no handler at all: logging.lastResort's turn
        state_of: dict[int, tuple[int, Any, list[Any]]] = {}
        others: list[tuple[logging.Handler, tuple[Any, ...]]] = []  # checked per line
        for handler in handlers:
            if getattr(handler, "write_json_line", None) is not None:
                entry = (handler.level, handler.formatter, list(handler.filters))
                state_of[id(handler)] = entry
                if not isinstance(handler, _WatchedHandler):
                    others.append((handler, entry))
        self.others = tuple(others)
        # Routes from the copies just taken, so a concurrent change is seen next time.
        self.info = _plan_route(handlers, state_of, logging.INFO)
        self.error = _plan_route(handlers, state_of, logging.ERROR)

    def current(self) -> bool:
        """Whether the logging tree still looks as it did when the plan was made."""
        if self.changes != _logfiles.handler_changes:
            return False
        first = self.first
        if (first.handlers, first.propagate, first.parent, first.filters) != self.first_state:
            return False
        second = self.second
        if second is not None:
            if (second.handlers, second.propagate, second.parent) != self.second_state:
                return False
            for logger, state in self.rest:
                if (logger.handlers, logger.propagate, logger.parent) != state:
                    return False
        for handler, known in self.others:
            if (handler.level, handler.formatter, handler.filters) != known:
                return False
        return True


def _plan_route(
    handlers: list[logging.Handler], state: dict[int, tuple[int, Any, list[Any]]], levelno: int
) -> _Route:
    route = _Route()
    files: dict[str, list[LogFile]] = {}
    for handler in handlers:
        known = state.get(id(handler))
        if known is None:  # takes no ready line: a LogRecord, its level checked per line
            route.records.append(handler)
            continue
        level, fmt, filters = known
        if levelno < level:
            continue
        # Exactly sfmon's formatter (a subclass may format differently) and no filter
        # but the request-context one (the line carries the request's own values).
        if type(fmt) is not JsonFormatter or any(
            type(f) is not RequestContextFilter for f in filters
        ):
            route.records.append(handler)
        elif type(handler) is DailyRotatingFileHandler:
            files.setdefault(fmt.static_json + "}\n", []).append(handler.file)
        else:
            route.writers.append((handler.write_json_line, fmt.static_json + "}"))  # type: ignore[attr-defined]
    route.files = tuple((tail, tuple(group)) for tail, group in files.items())
    route.others = bool(route.writers or route.records)
    return route


class AccessLogSink:
    """Write one JSON access line per finished request (SPEC §7); log failed requests.

    The line has ``timestamp``, ``level`` (ERROR for status ≥ 500, else INFO),
    ``logger``, ``message`` (``"Request completed: <status>"``), ``request_id``,
    ``method``, ``path`` (URL path, no query string), ``route``, ``status``,
    ``content_length``, ``latency_ms``, ``user_id``, and when known ``trace_id``,
    ``ttfb_ms``, ``client_addr`` and ``exception`` (the type name). Nothing else about
    the request is read, so headers, bodies and query strings are never logged. Strings
    are capped; any content still gives exactly one valid line.

    It goes to every handler the *logger* (default ``sfmon.access``) would use. sfmon's
    handlers with a :class:`~sfmon.logs.JsonFormatter` get the encoded line directly
    (no ``LogRecord``); other handlers get an ordinary record with the fields as extras.
    Which handler gets what is worked out once and re-checked before every line, so
    changes to the logging set-up apply from the next line.
    When the app raised, the exception is also logged at ERROR with its traceback and
    the request id on *error_logger* (default ``sfmon.errors``; ``None`` disables).
    The sink never raises; failures are counted (``log_write_failures()``).

    :param logger: logger (or its name) whose handlers receive the access line.
    :param error_logger: logger (or name) for tracebacks of failed requests, or ``None``.
    :param max_path_length: characters of ``path`` and ``route`` kept.
    :param max_value_length: characters kept of the other string fields.
    :param log_client_addr: include ``client_addr`` (personal data under GDPR).

    .. code-block:: python

        sink = AccessLogSink()
        app = sfmon.Monitor(app, sinks=[sink], access_log=False)
    """

    def __init__(
        self,
        logger: logging.Logger | str = ACCESS_LOGGER,
        *,
        error_logger: logging.Logger | str | None = ERROR_LOGGER,
        max_path_length: int = 2048,
        max_value_length: int = 256,
        log_client_addr: bool = True,
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.error_logger = (
            logging.getLogger(error_logger) if isinstance(error_logger, str) else error_logger
        )
        self.max_path_length = max_path_length
        self.max_value_length = max_value_length
        self.log_client_addr = log_client_addr
        # JSON by route (as the path, as the route), and by client address.
        self._routes: dict[str, tuple[str | None, str]] = {}
        self._addrs: dict[str, str] = {}
        self._ts: tuple[float, str] = (math.inf, "")  # (second, the line up to it)

    @property
    def logger(self) -> logging.Logger:
        """The logger whose handlers receive the access line."""
        return self._logger

    @logger.setter
    def logger(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._plan: _Plan | None = None
        # The line's fixed pieces, by status: after the timestamp up to request_id's
        # value, and after route's value up to content_length's.
        self._heads: dict[int, tuple[str, str]] = {}
        self._logger_js = _esc(logger.name)

    def _path(self, path: Any) -> str:
        limit = self.max_path_length
        text: str = path if type(path) is str else str(_cap(path, limit))
        if not text.isascii():
            text = _decode_path(text)
        return text if len(text) <= limit else str(_cap(text, limit))

    def _values(self, record: RequestRecord) -> tuple[Any, ...]:
        """The record's fields, sanitised: strings capped, numbers as numbers."""
        status = record.status if type(record.status) is int else int(record.status)
        path = self._path(record.path)
        vlen = self.max_value_length
        ttfb = record.ttfb_ms
        return (
            status,
            _cap(record.request_id, 128),
            _cap(record.method, 32),
            path,
            _cap(record.route, self.max_path_length),
            int(record.content_length),
            _number(record.latency_ms),
            _cap(record.user_id, vlen),
            None if record.trace_id is None else _cap(record.trace_id, 64),
            None if ttfb is None else _number(ttfb),
            _cap(record.client_addr, 64) if self.log_client_addr and record.client_addr else None,
            None if record.exception is None else _cap(record.exception, vlen),
        )

    def fields(self, record: RequestRecord, now: float | None = None) -> dict[str, Any]:
        """Return the access line's keys and values for *record*, in output order.

        .. code-block:: python

            AccessLogSink().fields(record)["message"]  # 'Request completed: 200'
        """
        return self._fields(self._values(record), time.time() if now is None else now)

    def line(self, record: RequestRecord, now: float | None = None) -> str:
        """Return the access line for *record* as JSON text (no newline, no static fields)."""
        return self._body(record, time.time() if now is None else now) + "}"

    def _fields(self, v: tuple[Any, ...], now: float) -> dict[str, Any]:
        status = v[0]
        out: dict[str, Any] = {
            "timestamp": format_timestamp(now),
            "level": "ERROR" if status >= 500 else "INFO",
            "logger": self.logger.name,
            "message": f"Request completed: {status}",
            "request_id": v[1],
            "method": v[2],
            "path": v[3],
            "route": v[4],
            "status": status,
            "content_length": v[5],
            "latency_ms": v[6],
            "user_id": v[7],
        }
        for key, value in zip(_OPTIONAL, v[8:]):
            if value is not None:
                out[key] = value
        return out

    def _head(self, status: Any) -> tuple[str, str]:
        status = int(status)
        level = "ERROR" if status >= 500 else "INFO"
        head = (
            f',"level":"{level}","logger":{self._logger_js},'
            f'"message":"Request completed: {status}","request_id":',
            f',"status":{status},"content_length":',
        )
        if len(self._heads) < 1024:
            self._heads[status] = head
        return head

    def _route(self, route: Any) -> tuple[str | None, str]:
        js = _js(route, self.max_path_length)
        if type(route) is not str:
            return None, ',"route":' + js
        # The route's JSON doubles as the path's when the path is the same ASCII text.
        entry = (js if route.isascii() else None, ',"route":' + js)
        if len(self._routes) < 2048:
            self._routes[route] = entry  # route labels are a bounded set
        return entry

    def _addr(self, addr: Any) -> str:
        if type(addr) is not str or len(addr) > 64:
            return ',"client_addr":' + _js(addr, 64)
        js = ',"client_addr":' + _esc(addr)
        if len(self._addrs) < 256:  # one or a few proxies, usually; else no caching
            self._addrs[addr] = js
        return js

    def _second(self, now: float) -> tuple[float, str]:
        sec = math.floor(now)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._ts = ts = (float(sec), f'{{"timestamp":"{stamp}.')
        return ts

    def _body(self, r: RequestRecord, now: float) -> str:
        # The document json.dumps(_fields()) gives, minus the closing brace, written out
        # by hand because encoding the dict costs twice as much: every string goes
        # through json's own C escaper (ASCII output; quotes, backslashes, control
        # characters and lone surrogates escaped), numbers are ints or finite floats.
        # Odd values (non-str, too long, non-ASCII path, negative or huge latency) take
        # the capped slow helpers. Everything else is kept few operations: the fixed text
        # (per second, status, method, route, client address) is cached or tabled, and
        # the line is one f-string of few pieces; in a server each line runs with cold
        # CPU caches, where every operation costs several times what it does in a loop.
        try:
            head = self._heads[r.status]
        except (KeyError, TypeError):
            head = self._head(r.status)
        ts = self._ts  # one tuple, so threads never pair a second with another's prefix
        frac = now - ts[0]  # exact; as format_timestamp: floor, then ms truncated
        if not 0.0 <= frac < 1.0:
            ts = self._second(now)
            frac = now - ts[0]
        route = r.route
        try:
            same_js, route_js = self._routes[route]
        except (KeyError, TypeError):
            same_js, route_js = self._route(route)
        path = r.path
        if same_js is not None and path == route and path.__class__ is str:
            path_js = same_js  # same text, same (or no) cap
        elif path.__class__ is not str or len(path) > self.max_path_length or not path.isascii():
            path_js = _esc(self._path(path))
        else:
            path_js = _esc(path)
        try:
            method_js = _METHODS[r.method]
        except (KeyError, TypeError):
            method_js = f',"method":{_js(r.method, 32)},"path":'
        rid = r.request_id
        rid_js = _esc(rid) if rid.__class__ is str and len(rid) <= 128 else _js(rid, 128)
        length = r.content_length
        if length.__class__ is not int:
            length = int(length)
        latency = r.latency_ms
        if latency.__class__ is float and 0.0 <= latency < 1e15:
            n = int(latency * 1000 + 0.5)  # µs, as _number rounds
            lat_int: Any = n // 1000
            lat_frac = _FRAC[n % 1000]
        else:
            lat_int, lat_frac = _num(latency), ""
        user = r.user_id
        if user is None:
            user_js = "null"
        elif user.__class__ is str and len(user) <= self.max_value_length:
            user_js = _esc(user)
        else:
            user_js = _js(user, self.max_value_length)
        # The optional keys, usually "" or a short piece, so the line is built once.
        trace_js = "" if r.trace_id is None else ',"trace_id":' + _js(r.trace_id, 64)
        ttfb = r.ttfb_ms
        ttfb_js = ""
        if ttfb is not None:
            if ttfb.__class__ is float and 0.0 <= ttfb < 1e15:
                n = int(ttfb * 1000 + 0.5)
                ttfb_js = f',"ttfb_ms":{n // 1000}{_FRAC[n % 1000]}'
            elif _number(ttfb) is not None:
                ttfb_js = ',"ttfb_ms":' + _num(ttfb)
        addr = r.client_addr
        addr_js = ""
        if addr and self.log_client_addr:
            try:
                addr_js = self._addrs[addr]
            except (KeyError, TypeError):
                addr_js = self._addr(addr)
        exc = r.exception
        exc_js = "" if exc is None else ',"exception":' + _js(exc, self.max_value_length)
        # One f-string (one BUILD_STRING); length and lat_int are exact ints here.
        return (
            f"{ts[1]}{_MS[int(frac * 1000)]}{head[0]}{rid_js}{method_js}{path_js}{route_js}"
            f'{head[1]}{length},"latency_ms":{lat_int}{lat_frac},"user_id":{user_js}'
            f"{trace_js}{ttfb_js}{addr_js}{exc_js}"
        )

    def __call__(self, record: RequestRecord) -> None:
        try:
            # Logger.isEnabledFor, then Logger.callHandlers minus the LogRecord for the
            # handlers that take a ready line; what goes where is planned in advance.
            error = record.status >= 500
            levelno = 40 if error else 20  # logging.ERROR, logging.INFO
            logger = self._logger
            if logger.isEnabledFor(levelno):
                plan = self._plan
                if plan is None or not plan.current():
                    plan = self._plan = _Plan(logger)
                now = time.time()
                route = plan.error if error else plan.info
                if route.files and not plan.filters:
                    body = self._body(record, now)
                    for tail, files in route.files:
                        write_all(files, (body + tail).encode("utf-8", "backslashreplace"), now)
                    if route.others:
                        self._others(record, plan, route, levelno, now, body)
                else:
                    self._others(record, plan, route, levelno, now, None)
        except Exception as exc:  # never into the request
            record_write_failure("access-sink", exc)
        if record.exc_info is not None and self.error_logger is not None:
            try:
                self._log_exception(record)
            except Exception as exc:
                record_write_failure("access-sink", exc)

    def _others(
        self,
        record: RequestRecord,
        plan: _Plan,
        route: _Route,
        levelno: int,
        now: float,
        body: str | None,
    ) -> None:
        """Everything but sfmon's files: other line writers, LogRecords, lastResort."""
        if plan.filters:  # logger-level filters need a real record and the full path
            self._logger.handle(self._make_record(self.fields(record, now), levelno, now))
            return
        if route.writers:
            if body is None:
                body = self._body(record, now)
            for write, tail in route.writers:
                write(body + tail)
        if route.records:
            log_record = self._make_record(self.fields(record, now), levelno, now)
            for handler in route.records:
                if levelno >= handler.level:
                    handler.handle(log_record)
        elif plan.last_resort:
            last = logging.lastResort
            if last is not None and levelno >= last.level:
                last.handle(self._make_record(self.fields(record, now), levelno, now))

    def _make_record(self, fields: dict[str, Any], levelno: int, now: float) -> logging.LogRecord:
        extra = {k: v for k, v in fields.items() if k not in _RECORD_OWN}
        rec = self.logger.makeRecord(
            self.logger.name, levelno, "(sfmon)", 0, fields["message"], (), None, extra=extra
        )
        rec.created = now
        return rec

    def _log_exception(self, record: RequestRecord) -> None:
        error_logger = self.error_logger
        if error_logger is None:
            return
        exc_type = record.exc_info[0] if record.exc_info else None
        name = record.exception or getattr(exc_type, "__name__", "Exception")
        path = record.path if record.path.isascii() else _decode_path(record.path)
        error_logger.error(
            "Unhandled exception: %s",
            _cap(name, self.max_value_length),
            exc_info=record.exc_info,  # type: ignore[arg-type]
            extra={
                "request_id": record.request_id,
                "method": _cap(record.method, 32),
                "path": _cap(path, self.max_path_length),
                "route": _cap(record.route, self.max_path_length),
                "status": record.status,
            },
        )
