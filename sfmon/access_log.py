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

from .logfiles import DailyRotatingFileHandler, record_write_failure
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
    number = round(float(value), 3)
    return number if math.isfinite(number) else None  # NaN/inf are not JSON


def _js(value: Any, limit: int) -> str:
    """*value* capped and JSON-encoded (``null`` for None)."""
    return "null" if value is None else _esc(_cap(value, limit))


def _num(value: Any) -> str:
    """JSON for a latency: ms rounded to µs (same float as ``_number``), or ``null``."""
    if value is None:
        return "null"
    number = _number(value)
    return "null" if number is None else float.__repr__(number)


_METHODS = {m: f'"{m}"' for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


def _decode_path(path: str) -> str:
    # PEP 3333 hands PATH_INFO over as bytes decoded as latin-1; undo that so UTF-8
    # paths read naturally. Invalid UTF-8 becomes \xNN text, surrogateescape'd bytes
    # count as bytes; a path with other characters above U+00FF was decoded already and
    # is kept as it is (JSON-escaped).
    try:
        return path.encode("latin-1", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path


def _plain_filters(handler: logging.Handler) -> bool:
    filters = handler.filters
    if not filters or (len(filters) == 1 and type(filters[0]) is RequestContextFilter):
        return True
    return all(type(f) is RequestContextFilter for f in filters)


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
        self._logger_js = _esc(self.logger.name)
        self._routes: dict[str, str] = {}
        self._ts: tuple[int, str] = (-1, "")

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

    def _body(self, r: RequestRecord, now: float) -> str:
        # The document json.dumps(_fields()) gives, minus the closing brace, written out
        # by hand because encoding the dict costs twice as much: every string goes
        # through json's own C escaper (ASCII output; quotes, backslashes, control
        # characters and lone surrogates escaped), numbers are ints or finite floats.
        # Odd values (non-str, too long, non-ASCII path) take the capped slow helpers.
        status = r.status
        if type(status) is not int:
            status = int(status)
        sec = int(now)
        ts = self._ts  # one tuple, so threads never pair a second with another's prefix
        if ts[0] != sec:
            ts = self._ts = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
        path = r.path
        if type(path) is not str or len(path) > self.max_path_length or not path.isascii():
            path = self._path(path)
        route = r.route
        route_js = self._routes.get(route)
        if route_js is None:
            route_js = _js(route, self.max_path_length)
            if len(self._routes) < 2048 and type(route) is str:
                self._routes[route] = route_js  # route labels are a bounded set
        method = r.method
        method_js = _METHODS.get(method) if type(method) is str else None
        rid = r.request_id
        user = r.user_id
        latency = r.latency_ms
        rid_js = _esc(rid) if type(rid) is str and len(rid) <= 128 else _js(rid, 128)
        length = r.content_length
        if type(length) is not int:
            length = int(length)
        # ".3f" parses back to exactly round(x, 3), at a third of the cost.
        latency_js = (
            f"{latency:.3f}"
            if type(latency) is float and latency - latency == 0.0
            else _num(latency)
        )
        if user is None:
            user_js = "null"
        elif type(user) is str and len(user) <= self.max_value_length:
            user_js = _esc(user)
        else:
            user_js = _js(user, self.max_value_length)
        # The optional keys, usually "" or a short piece, so the line is built once.
        trace_js = "" if r.trace_id is None else ',"trace_id":' + _js(r.trace_id, 64)
        ttfb = r.ttfb_ms
        ttfb_js = ""
        if ttfb is not None:
            if type(ttfb) is float and ttfb - ttfb == 0.0:
                ttfb_js = f',"ttfb_ms":{ttfb:.3f}'
            elif _number(ttfb) is not None:
                ttfb_js = ',"ttfb_ms":' + _num(ttfb)
        addr = r.client_addr
        addr_js = ""
        if addr and self.log_client_addr:
            ok = type(addr) is str and len(addr) <= 64
            addr_js = ',"client_addr":' + (_esc(addr) if ok else _js(addr, 64))
        exc = r.exception
        exc_js = "" if exc is None else ',"exception":' + _js(exc, self.max_value_length)
        # An f-string (one BUILD_STRING) costs three quarters of the same "%" template;
        # status and content_length are exact ints here, so {x} is what %d gave.
        return (
            f'{{"timestamp":"{ts[1]}.{int((now - sec) * 1000):03d}Z",'
            f'"level":"{"ERROR" if status >= 500 else "INFO"}","logger":{self._logger_js},'
            f'"message":"Request completed: {status}","request_id":{rid_js},'
            f'"method":{method_js or _js(method, 32)},"path":{_esc(path)},"route":{route_js},'
            f'"status":{status},"content_length":{length},"latency_ms":{latency_js},'
            f'"user_id":{user_js}{trace_js}{ttfb_js}{addr_js}{exc_js}'
        )

    def __call__(self, record: RequestRecord) -> None:
        try:
            self._access_line(record)
        except Exception as exc:  # never into the request
            record_write_failure("access-sink", exc)
        if record.exc_info is not None and self.error_logger is not None:
            try:
                self._log_exception(record)
            except Exception as exc:
                record_write_failure("access-sink", exc)

    def _access_line(self, record: RequestRecord) -> None:
        levelno = logging.ERROR if record.status >= 500 else logging.INFO
        logger = self.logger
        if not logger.isEnabledFor(levelno):
            return
        now = time.time()
        if logger.filters:  # logger-level filters need a real record and the full path
            logger.handle(self._make_record(self.fields(record, now), levelno, now))
            return
        body: str | None = None
        data: bytes | None = None  # the line as sfmon's file handlers write it
        data_static: str | None = None
        log_record: logging.LogRecord | None = None
        found = 0
        current: logging.Logger | None = logger
        # Logger.callHandlers, minus the LogRecord for handlers that take a ready line.
        while current is not None:
            for handler in current.handlers:
                found += 1
                if levelno < handler.level:
                    continue
                fmt = handler.formatter
                write = getattr(handler, "write_json_line", None)
                filters = handler.filters
                if (
                    write is not None
                    and isinstance(fmt, JsonFormatter)
                    and (
                        (len(filters) == 1 and type(filters[0]) is RequestContextFilter)
                        or _plain_filters(handler)
                    )
                ):
                    if body is None:
                        body = self._body(record, now)
                    static = fmt.static_json
                    if type(handler) is DailyRotatingFileHandler:
                        # What its write_json_line does, encoded once for all such files.
                        if data is None or static is not data_static:
                            data = (body + static + "}\n").encode("utf-8", "backslashreplace")
                            data_static = static
                        handler.file.write(data)
                    else:
                        write(body + static + "}")
                else:
                    if log_record is None:
                        log_record = self._make_record(self.fields(record, now), levelno, now)
                    handler.handle(log_record)
            current = current.parent if current.propagate else None
        last = logging.lastResort
        if not found and last is not None and levelno >= last.level:
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
