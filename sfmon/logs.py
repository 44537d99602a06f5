"""JSON log lines: the formatter, the request-context filter and ``configure_logging``.

Every line is one JSON object built by an encoder, so no logged value can break or
forge a line; :class:`~sfmon.access_log.AccessLogSink` writes the per-request access
line through the same handlers.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from pythonjsonlogger.json import JsonEncoder
from pythonjsonlogger.json import JsonFormatter as _PjlJsonFormatter

from .logfiles import (
    DailyRotatingFileHandler,
    _WatchedHandler,
    log_write_failures,
    record_write_failure,
)
from .request_id import current_request_id, current_trace_id, current_user_id

__all__ = [
    "ACCESS_LOGGER",
    "ERROR_LOGGER",
    "JsonFormatter",
    "JsonStreamHandler",
    "RequestContextFilter",
    "configure_logging",
    "format_timestamp",
    "log_write_failures",
]

ACCESS_LOGGER = "sfmon.access"
ERROR_LOGGER = "sfmon.errors"

# Keys the formatter owns: extras and dict messages cannot overwrite them.
_OWN_KEYS = ("timestamp", "level", "logger", "message", "request_id")
# Keys of the access line (sfmon.access_log); static fields never shadow them.
_ACCESS_KEYS = frozenset(
    (*_OWN_KEYS, "method", "path", "route", "status", "content_length", "latency_ms")
    + ("user_id", "trace_id", "ttfb_ms", "client_addr", "exception")
)
_TRUNCATED = "...[truncated]"

_ts_cache: tuple[int, str] = (-1, "")


def format_timestamp(t: float) -> str:
    """Return *t* (seconds since the epoch) as UTC ISO 8601 with milliseconds and ``Z``.

    .. code-block:: python

        format_timestamp(0.5)  # '1970-01-01T00:00:00.500Z'
    """
    global _ts_cache
    sec = math.floor(t)
    ms = int((t - sec) * 1000)  # truncated, as the access-log sink does
    cached_sec, prefix = _ts_cache
    if sec != cached_sec:  # strftime once per second, not once per line
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ts_cache = (sec, prefix)
    return f"{prefix}.{ms:03d}Z"


class RequestContextFilter(logging.Filter):
    """Put ``request_id`` (and ``trace_id``, ``user_id`` when known) on every record.

    Values come from the context variables of :mod:`sfmon.request_id`, which the
    middleware sets for the duration of a request and resets after it (errors too).
    Outside a request nothing is added. Install it on *handlers*, so records of every
    logger, propagated or not, get it.

    .. code-block:: python

        handler.addFilter(RequestContextFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_request_id.get()
        if rid is not None:
            record.request_id = rid
            tid = current_trace_id.get()
            if tid is not None:
                record.trace_id = tid
            uid = current_user_id.get()
            if uid is not None:
                record.user_id = uid
        return True


def _cap(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: max(limit - len(_TRUNCATED), 0)] + _TRUNCATED


class JsonFormatter(_PjlJsonFormatter):
    """python-json-logger's formatter with sfmon's fixed leading keys.

    Lines start with ``timestamp`` (UTC, ms, ``Z``), ``level``, ``logger``, ``message``
    and ``request_id`` (``null`` outside a request), then ``trace_id``/``user_id`` when
    known, *static_fields*, and the record's extras (``exc_info`` as text). Those
    leading keys cannot be overwritten by extras or dict messages. Output is compact,
    ASCII-only JSON (``ensure_ascii`` also keeps lone surrogates encodable); the message
    and the traceback are capped. A record that cannot be serialised still gives one line.

    :param static_fields: keys added to every line (e.g. ``{"service": "api"}``).
    :param max_message_length: characters of ``message`` kept.
    :param max_exc_length: characters of ``exc_info``/``stack_info`` kept (the end).

    .. code-block:: python

        handler.setFormatter(JsonFormatter(static_fields={"service": "softfactory"}))
    """

    def __init__(
        self,
        *,
        static_fields: Mapping[str, Any] | None = None,
        max_message_length: int = 8192,
        max_exc_length: int = 8192,
        **kwargs: Any,
    ) -> None:
        super().__init__(static_fields=dict(static_fields or {}), **kwargs)
        self.max_message_length = max_message_length
        self.max_exc_length = max_exc_length
        self._skip = set(self._skip_fields) | set(_OWN_KEYS) | {"trace_id", "user_id"}
        self._encoder = JsonEncoder(ensure_ascii=True, separators=(",", ":"))
        # Static fields as a ready JSON fragment, appended to access lines.
        extra = {k: v for k, v in self.static_fields.items() if k not in _ACCESS_KEYS}
        self.static_json = "," + self._encoder.encode(extra)[1:-1] if extra else ""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return str(super().format(record))
        except Exception as exc:  # a broken extra must not cost the line
            return self._encoder.encode(
                {
                    "timestamp": format_timestamp(record.created),
                    "level": record.levelname,
                    "logger": record.name,
                    "message": _cap(str(record.msg)[:1024], self.max_message_length),
                    "request_id": getattr(record, "request_id", None),
                    "format_error": type(exc).__name__,
                }
            )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        d = record.__dict__
        own = {
            "timestamp": format_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _cap(record.message, self.max_message_length),
            "request_id": d.get("request_id"),
        }
        log_data.update(own)
        for key in ("trace_id", "user_id"):
            if d.get(key) is not None:
                log_data[key] = d[key]
        log_data.update(self.static_fields)
        for key, value in message_dict.items():
            if key in ("exc_info", "stack_info") and isinstance(value, str):
                value = (
                    value
                    if len(value) <= self.max_exc_length
                    else _TRUNCATED + value[-self.max_exc_length :]
                )
            log_data[key] = value
        for key, value in d.items():
            if key not in self._skip and key[:1] != "_":
                log_data[key] = value
        log_data.update(own)  # a dict message or extra cannot forge these (order is kept)

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        return self._encoder.encode(log_data)


class JsonStreamHandler(_WatchedHandler, logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` (stdout by default) whose write failures are counted, not raised.

    A failure (closed pipe, full disk behind a redirect) is reported once on stderr and
    counted under *destination* in ``sfmon_log_write_failures_total``.

    .. code-block:: python

        logging.getLogger().addHandler(JsonStreamHandler())
    """

    def __init__(self, stream: Any = None, *, destination: str = "stdout") -> None:
        super().__init__(sys.stdout if stream is None else stream)
        self.destination = destination

    def write_json_line(self, line: str) -> None:
        """Write an already formatted line (the access-log fast path)."""
        self.acquire()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except Exception as exc:
            record_write_failure(self.destination, exc)
        finally:
            self.release()

    def handleError(self, record: logging.LogRecord) -> None:
        record_write_failure(self.destination, sys.exc_info()[1])


# (logger, handler) pairs installed by configure_logging, removed on the next call.
_installed: list[tuple[logging.Logger, logging.Handler]] = []

_DEFAULT_RETENTION: Mapping[str, int] = {"app": 30, "access": 14, "errors": 90}


def configure_logging(
    app: Any = None,
    log_file: str | os.PathLike[str] | None = "logs/app.log",
    debug: bool = False,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    stdout: bool = True,
    access_log: str | os.PathLike[str] | None = "access.log",
    error_log: str | os.PathLike[str] | None = "errors.log",
    retention_days: Mapping[str, int] = _DEFAULT_RETENTION,
    rotate_when: str = "midnight",
    rotate_interval_seconds: float | None = None,
    utc: bool = True,
    level: int | str | None = None,
    static_fields: Mapping[str, Any] | None = None,
) -> logging.Logger:
    """Send every log record, as one JSON line each, to stdout and the log files.

    Destinations (seed §2): stdout; *log_file* (``logs/app.log``, everything, access
    lines included); *access_log* (access lines only); *error_log* (ERROR and above).
    Relative *access_log*/*error_log* names live next to *log_file* (or in *log_dir*,
    which also moves *log_file* when that is a bare name); ``None`` turns one off. Files
    rotate at midnight (UTC unless ``utc=False``), or every *rotate_interval_seconds*,
    and keep *retention_days* (keys ``app``, ``access``, ``errors``) rotated files; any
    number of processes may write them. Calling it again replaces what the previous
    call installed. Unwritable destinations never raise (see :func:`log_write_failures`).

    :param app: a Flask-like app or ``None``; its ``logger`` is returned and Flask's
        default stderr handler is removed so lines are not doubled.
    :param debug: root level DEBUG instead of INFO (unless *level* is given).
    :returns: ``app.logger`` when there is one, else the root logger.

    .. code-block:: python

        logger = sfmon.configure_logging(app, log_file="logs/app.log", debug=False)
        logger.info("payment captured", extra={"amount_cents": 1200})
    """
    retention = {**_DEFAULT_RETENTION, **retention_days}
    unknown = set(retention) - set(_DEFAULT_RETENTION)
    if unknown:
        raise ValueError(f"retention_days: unknown keys {sorted(unknown)}; use app/access/errors")
    for role, days in retention.items():
        if type(days) is not int or days < 1:
            raise ValueError(f"retention_days[{role!r}] must be an int >= 1, got {days!r}")
    if rotate_when not in ("midnight", "never"):
        raise ValueError(f"rotate_when must be 'midnight' or 'never', got {rotate_when!r}")
    if rotate_interval_seconds is not None and not rotate_interval_seconds > 0:
        raise ValueError(f"rotate_interval_seconds must be > 0, got {rotate_interval_seconds!r}")
    root = logging.getLogger()
    access_logger = logging.getLogger(ACCESS_LOGGER)
    for logger, handler in _installed:
        logger.removeHandler(handler)
        handler.close()
    _installed.clear()

    app_path: str | None = None
    if log_file is not None:
        app_path = os.fspath(log_file)
        if log_dir is not None and not os.path.dirname(app_path):
            app_path = os.path.join(os.fspath(log_dir), app_path)
    if log_dir is not None:
        base = os.fspath(log_dir)
    else:
        base = (os.path.dirname(app_path) or ".") if app_path is not None else "logs"

    formatter = JsonFormatter(static_fields=static_fields)
    context = RequestContextFilter()
    file_options: dict[str, Any] = {
        "rotate_when": rotate_when,
        "rotate_interval_seconds": rotate_interval_seconds,
        "utc": utc,
    }

    def add(logger: logging.Logger, handler: logging.Handler, handler_level: int) -> None:
        handler.setLevel(handler_level)
        handler.setFormatter(formatter)
        handler.addFilter(context)
        logger.addHandler(handler)
        _installed.append((logger, handler))

    def file_handler(name: str | os.PathLike[str], role: str) -> DailyRotatingFileHandler:
        path = os.fspath(name) if role == "app" else os.path.join(base, os.fspath(name))
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        except OSError:
            pass  # reported by the handler on its first write, without raising
        return DailyRotatingFileHandler(path, retention=retention[role], **file_options)

    if stdout:
        add(root, JsonStreamHandler(sys.stdout), logging.NOTSET)
    if app_path is not None:
        add(root, file_handler(app_path, "app"), logging.NOTSET)
    if error_log is not None:
        add(root, file_handler(error_log, "errors"), logging.ERROR)
    if access_log is not None:
        add(access_logger, file_handler(access_log, "access"), logging.NOTSET)

    if level is None:
        level = logging.DEBUG if debug else logging.INFO
    root.setLevel(level)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = True  # access lines also reach stdout and app.log

    app_logger = getattr(app, "logger", None)
    if isinstance(app_logger, logging.Logger):
        # Flask adds a stderr text handler unless the root has one; we add ours to the
        # root, so drop Flask's (looked up, never imported) to avoid doubled lines.
        flask_logging = sys.modules.get("flask.logging")
        default = getattr(flask_logging, "default_handler", None)
        if default is not None and default in app_logger.handlers:
            app_logger.removeHandler(default)
        app_logger.propagate = True
        return app_logger
    return root


def __getattr__(name: str) -> Any:
    # AccessLogSink lives in its own module; kept importable from here.
    if name == "AccessLogSink":
        from .access_log import AccessLogSink

        return AccessLogSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
