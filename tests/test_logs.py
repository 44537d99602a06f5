"""JSON formatter, request-context filter, access-log sink and configure_logging."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sfmon import logfailures
from sfmon.access_log import AccessLogSink
from sfmon.logfiles import DailyRotatingFileHandler
from sfmon.logs import (
    ACCESS_LOGGER,
    ERROR_LOGGER,
    JsonFormatter,
    JsonStreamHandler,
    RequestContextFilter,
    configure_logging,
    format_timestamp,
    log_write_failures,
)
from sfmon.record import RequestRecord
from sfmon.request_id import current_request_id, current_trace_id, current_user_id

ROOT = Path(__file__).resolve().parent.parent
ACCESS_KEYS = [
    "timestamp",
    "level",
    "logger",
    "message",
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "content_length",
    "latency_ms",
    "user_id",
]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test leaves the logging tree and the failure counts as it found them."""
    from sfmon import logs

    names = ["", ACCESS_LOGGER, ERROR_LOGGER, "t", "t.app", "t.access"]
    saved = {
        n: (list(lg.handlers), lg.level, lg.propagate, list(lg.filters))
        for n in names
        for lg in [logging.getLogger(n)]
    }
    logfailures._failures.clear()
    logfailures._reported.clear()
    yield
    for logger, handler in logs._installed:
        logger.removeHandler(handler)
        handler.close()
    logs._installed.clear()
    for n, (handlers, level, propagate, filters) in saved.items():
        logger = logging.getLogger(n)
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)
                h.close()
        logger.setLevel(level)
        logger.propagate = propagate
        logger.filters[:] = filters
    logfailures._failures.clear()
    logfailures._reported.clear()


def make_record(**over: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": "a1b2c3d4",
        "trace_id": None,
        "method": "POST",
        "method_label": "POST",
        "path": "/api/coocook/bookings",
        "route": "/api/coocook/bookings",
        "status": 200,
        "content_length": 256,
        "latency_ms": 45.3,
        "ttfb_ms": None,
        "started_at": 1_700_000_000.0,
        "user_id": "42",
        "client_addr": None,
        "exception": None,
        "exc_info": None,
    }
    fields.update(over)
    return RequestRecord(**fields)


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f]


def file_logger(tmp_path: Path, name: str = "t") -> tuple[logging.Logger, Path]:
    """A logger writing JSON lines to one sfmon file, nowhere else."""
    path = tmp_path / f"{name}.log"
    handler = DailyRotatingFileHandler(path)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, path


# -- timestamps, filter, formatter ----------------------------------------------------


def test_format_timestamp_is_utc_milliseconds_z() -> None:
    assert format_timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert format_timestamp(1772015445.1239) == "2026-02-25T10:30:45.123Z"
    assert format_timestamp(1772015446.0) == "2026-02-25T10:30:46.000Z"


def test_filter_adds_context_only_during_a_request() -> None:
    f = RequestContextFilter()
    outside = logging.makeLogRecord({"msg": "x"})
    tokens = (
        current_request_id.set("rid-1"),
        current_trace_id.set("4bf92f3577b34da6a3ce929d0e0e4736"),
        current_user_id.set("42"),
    )
    inside = logging.makeLogRecord({"msg": "x"})
    f.filter(inside)
    for var, token in zip((current_request_id, current_trace_id, current_user_id), tokens):
        var.reset(token)
    f.filter(outside)

    assert (inside.request_id, inside.trace_id, inside.user_id) == (  # type: ignore[attr-defined]
        "rid-1",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "42",
    )
    assert not hasattr(outside, "request_id")


def test_filter_thread_reuse_does_not_carry_the_old_id(tmp_path: Path) -> None:
    """gthread: one thread serves a request with an id, then one without (also after
    an error in the first); the second request's records have no id."""
    logger, path = file_logger(tmp_path)

    def serve_two() -> None:
        token = current_request_id.set("first-request")
        try:
            logger.info("in first")
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("first failed")
        finally:
            current_request_id.reset(token)
        logger.info("in second")

    t = threading.Thread(target=serve_two)
    t.start()
    t.join()

    lines = read_lines(path)
    assert [(x["message"], x["request_id"]) for x in lines] == [
        ("in first", "first-request"),
        ("first failed", "first-request"),
        ("in second", None),
    ]
    assert "RuntimeError: boom" in lines[1]["exc_info"]


def test_formatter_key_order_and_extras(tmp_path: Path) -> None:
    logger, path = file_logger(tmp_path)
    token = current_request_id.set("rid-9")
    try:
        logger.warning("charged %s cents", 1200, extra={"amount_cents": 1200, "card": None})
    finally:
        current_request_id.reset(token)

    (line,) = read_lines(path)
    assert list(line)[:5] == ["timestamp", "level", "logger", "message", "request_id"]
    assert line["level"] == "WARNING"
    assert line["logger"] == "t"
    assert line["message"] == "charged 1200 cents"
    assert line["request_id"] == "rid-9"
    assert line["amount_cents"] == 1200 and line["card"] is None
    assert line["timestamp"].endswith("Z") and len(line["timestamp"]) == 24


def test_formatter_leading_keys_cannot_be_forged(tmp_path: Path) -> None:
    logger, path = file_logger(tmp_path)
    token = current_request_id.set("real-id")
    try:
        logger.info("m", extra={"level": "DEBUG", "logger": "x", "timestamp": "y"})
        logger.info({"request_id": "forged", "level": "DEBUG", "k": "v"})
    finally:
        current_request_id.reset(token)

    a, b = read_lines(path)
    assert (a["level"], a["logger"], a["request_id"]) == ("INFO", "t", "real-id")
    assert a["timestamp"].endswith("Z")
    assert (b["level"], b["request_id"], b["k"]) == ("INFO", "real-id", "v")


def test_formatter_survives_hostile_messages(tmp_path: Path) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no")

        __repr__ = __str__

    logger, path = file_logger(tmp_path)
    logger.info("lone surrogate \udcff, NUL \x00, newline \n tab \t backslash \\ \u2028")
    logger.info("x" * 20000)
    logger.info("obj", extra={"obj": Unprintable(), "when": 1j})
    logger.info({1: "numeric key", "nested": {"a": [1, 2]}})

    with open(path, "rb") as f:
        raw = f.read()
    assert raw.count(b"\n") == 4
    assert raw.isascii()
    lines = read_lines(path)
    assert lines[0]["message"].startswith("lone surrogate \udcff, NUL \x00, newline \n")
    assert len(lines[1]["message"]) == 8192 and lines[1]["message"].endswith("...[truncated]")
    assert lines[2]["message"] == "obj"
    assert lines[3]["nested"] == {"a": [1, 2]}


def test_formatter_caps_tracebacks_keeping_the_end(tmp_path: Path) -> None:
    logger, path = file_logger(tmp_path)
    try:
        raise ValueError("the end" + "y" * 20000)
    except ValueError:
        logger.exception("failed")

    (line,) = read_lines(path)
    assert len(line["exc_info"]) <= 8192 + len("...[truncated]")
    assert line["exc_info"].startswith("...[truncated]")
    assert line["exc_info"].endswith("y")


def test_formatter_static_fields() -> None:
    fmt = JsonFormatter(static_fields={"service": "softfactory", "status": "shadowed"})
    line = json.loads(fmt.format(logging.makeLogRecord({"msg": "hi", "name": "n"})))

    assert line["service"] == "softfactory"
    assert fmt.static_json == ',"service":"softfactory"'  # never shadows access keys


# -- the access-log sink --------------------------------------------------------------


def sink_to_file(tmp_path: Path) -> tuple[AccessLogSink, Path]:
    logger, path = file_logger(tmp_path, "t.access")
    return AccessLogSink(logger, error_logger=None), path


def test_access_line_has_the_spec_keys(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    sink(make_record(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", ttfb_ms=12.3456789))

    (line,) = read_lines(path)
    assert list(line)[: len(ACCESS_KEYS)] == ACCESS_KEYS
    assert line["message"] == "Request completed: 200"
    assert line["level"] == "INFO"
    assert line["logger"] == "t.access"
    assert (line["status"], line["content_length"], line["latency_ms"]) == (200, 256, 45.3)
    assert line["user_id"] == "42"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["ttfb_ms"] == 12.346


def test_access_line_fast_path_equals_record_path(tmp_path: Path) -> None:
    """sfmon handlers get a hand-built line; other handlers a LogRecord: same JSON."""
    fast = DailyRotatingFileHandler(tmp_path / "fast.log")
    slow = logging.FileHandler(tmp_path / "slow.log", encoding="utf-8")
    logger = logging.getLogger("t.access")
    logger.propagate = False
    for h in (fast, slow):
        h.setFormatter(JsonFormatter(static_fields={"service": "api"}))
        h.addFilter(RequestContextFilter())
        logger.addHandler(h)
    sink = AccessLogSink(logger, error_logger=None)
    sink(make_record(path="/caf\xc3\xa9", ttfb_ms=3.0, client_addr="10.0.0.1", status=503))
    slow.close()

    assert read_lines(tmp_path / "fast.log") == read_lines(tmp_path / "slow.log")
    assert read_lines(tmp_path / "fast.log")[0]["service"] == "api"


HOSTILE = [
    pytest.param({"path": "/" + "a" * 5000}, id="5000-char path"),
    pytest.param({"route": "/r" * 3000, "user_id": "u" * 5000}, id="5000-char route+user"),
    pytest.param({"request_id": "{urn:uuid:" + "-" * 5000 + "c10f}"}, id="urn-uuid id"),
    pytest.param({"path": "/caf\xc3\xa9/\xff\xfe"}, id="latin-1 bytes (utf-8 and invalid)"),
    pytest.param({"path": "/x/\udcff\udc80"}, id="surrogateescape bytes"),
    pytest.param({"path": "/\ud800lone"}, id="lone high surrogate"),
    pytest.param({"path": "/back\\slash\\", "user_id": "tab\there"}, id="backslash and TAB"),
    pytest.param({"path": "/x%0A%7B%22forged%22:1%7D%0A"}, id="percent-encoded newline"),
    pytest.param({"path": '/x\n{"forged": 1}\r\ny'}, id="real newline"),
    pytest.param({"path": "/\x00\x1b[31mred\u202e\u2028"}, id="control and bidi chars"),
    pytest.param({"method": 'GET" "x' * 10, "client_addr": "\n" * 100}, id="quotes in method"),
    pytest.param({"user_id": 42, "content_length": 0}, id="int user id"),
    pytest.param({"latency_ms": float("nan"), "ttfb_ms": float("inf")}, id="nan latency"),
    pytest.param({"exception": "E" * 1000, "status": 500}, id="long exception name"),
]


@pytest.mark.parametrize("over", HOSTILE)
def test_access_line_hostile_input_gives_exactly_one_valid_line(
    tmp_path: Path, over: dict[str, Any]
) -> None:
    sink, path = sink_to_file(tmp_path)
    record = make_record(**over)

    sink(record)

    with open(path, "rb") as f:
        raw = f.read()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert raw.isascii()
    line = json.loads(raw)
    assert line == json.loads(json.dumps(sink.fields(record))) | {"timestamp": line["timestamp"]}
    assert len(line["path"]) <= 2048
    assert len(line["route"]) <= 2048
    assert len(line["request_id"]) <= 128
    assert line["user_id"] is None or len(str(line["user_id"])) <= 256
    assert "forged" not in line


def test_access_path_is_decoded_from_wsgi_latin1(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    sink(make_record(path="/caf\xc3\xa9/\xff"))

    assert read_lines(path)[0]["path"] == "/café/\\xff"


def test_access_sink_never_raises_and_counts(tmp_path: Path) -> None:
    sink, _ = sink_to_file(tmp_path)

    sink(make_record(status="not a number"))

    assert log_write_failures() == {"access-sink": 1}


def test_access_level_follows_status_and_logger_level(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    sink.logger.setLevel(logging.WARNING)

    sink(make_record(status=200))
    sink(make_record(status=404))
    sink(make_record(status=502))

    assert [(x["status"], x["level"]) for x in read_lines(path)] == [(502, "ERROR")]


def test_access_sink_honours_logger_filters(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    sink.logger.addFilter(lambda r: r.status != 404)  # type: ignore[attr-defined]

    sink(make_record(status=404))
    sink(make_record(status=200))

    assert [x["status"] for x in read_lines(path)] == [200]


def test_access_numbers_and_timestamp_match_the_record_path() -> None:
    """The hand-built line and the LogRecord path round latencies and times alike."""
    sink = AccessLogSink(logging.getLogger("t.access"), error_logger=None)
    record = make_record(ttfb_ms=0.0)
    values = [0.0, 0.0005, 1.0005, 2.5e-4, 45.3, 999.9995, 1e14, 9.99e14, 1e15, 1e300]
    values += [i / 7919 for i in range(0, 100_000, 37)] + [-1.5, -0.0]
    for x in values:
        record.latency_ms = record.ttfb_ms = x
        line = json.loads(sink.line(record, 1.0))
        fields = json.loads(json.dumps(sink.fields(record, 1.0)))
        assert (line["latency_ms"], line["ttfb_ms"]) == (fields["latency_ms"], fields["ttfb_ms"])
        assert abs(line["latency_ms"] - x) <= 0.0005 * max(1.0, abs(x) / 1e3)
    for now in [0.5, 1772015445.1239, 1772015446.0, 1772015446.9999, -0.5]:
        assert json.loads(sink.line(record, now))["timestamp"] == format_timestamp(now)
    assert format_timestamp(-0.5) == "1969-12-31T23:59:59.500Z"


def test_access_line_is_one_write_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging(log_file=str(tmp_path / "app.log"), stdout=False)
    sink = AccessLogSink(error_logger=None)
    sink(make_record())  # files opened, plan made
    writes: list[tuple[int, bytes]] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append((fd, bytes(data)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    sink(make_record(status=404))
    sink(make_record(status=503))  # errors.log too

    assert [len(set(fd for fd, _ in writes[:2])), len(writes)] == [2, 5]
    assert all(data.count(b"\n") == 1 and data.endswith(b"}\n") for _, data in writes)
    assert len(read_lines(tmp_path / "access.log")) == len(read_lines(tmp_path / "app.log")) == 3
    assert [x["status"] for x in read_lines(tmp_path / "errors.log")] == [503]


# -- the access sink follows changes of the logging set-up ------------------------------


def test_access_sink_follows_handlers_added_and_removed(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    sink(make_record(status=201))
    second = DailyRotatingFileHandler(tmp_path / "second.log")
    second.setFormatter(JsonFormatter())
    text = io.StringIO()
    foreign = logging.StreamHandler(text)
    foreign.setFormatter(JsonFormatter())
    sink.logger.addHandler(second)
    sink.logger.handlers.append(foreign)  # in place, not through addHandler

    sink(make_record(status=202))
    sink.logger.removeHandler(second)
    sink.logger.handlers.remove(foreign)
    sink(make_record(status=203))

    assert [x["status"] for x in read_lines(path)] == [201, 202, 203]
    assert [x["status"] for x in read_lines(tmp_path / "second.log")] == [202]
    assert [json.loads(x)["status"] for x in text.getvalue().splitlines()] == [202]
    second.close()


def test_access_sink_follows_handlers_of_ancestors(tmp_path: Path) -> None:
    """Handlers added to the parent and to the root (the 2nd and 3rd loggers visited)."""
    sink, path = sink_to_file(tmp_path)  # "t.access", not propagating
    sink.logger.propagate = True
    parent, root = logging.getLogger("t"), logging.getLogger()
    parent.propagate = True
    texts = [io.StringIO(), io.StringIO()]
    handlers = [logging.StreamHandler(t) for t in texts]  # made before the first line
    for h in handlers:
        h.setFormatter(JsonFormatter())
    sink(make_record(status=201))
    parent.addHandler(handlers[0])
    sink(make_record(status=202))
    root.addHandler(handlers[1])
    try:
        sink(make_record(status=203))
    finally:
        root.removeHandler(handlers[1])
    parent.propagate = False
    sink(make_record(status=204))

    assert [x["status"] for x in read_lines(path)] == [201, 202, 203, 204]
    got = [[json.loads(x)["status"] for x in t.getvalue().splitlines()] for t in texts]
    assert got == [[202, 203, 204], [203]]


def test_access_sink_follows_handler_level_formatter_and_filters(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    (handler,) = sink.logger.handlers
    sink(make_record(status=200))
    handler.setLevel(logging.ERROR)
    sink(make_record(status=201))  # below the handler's level
    sink(make_record(status=500))
    handler.level = logging.NOTSET  # assigned, not through setLevel
    sink(make_record(status=202))
    handler.setFormatter(JsonFormatter(static_fields={"service": "api"}))
    sink(make_record(status=203))
    handler.addFilter(lambda r: r.status != 204)  # type: ignore[attr-defined]
    sink(make_record(status=204))
    sink(make_record(status=205))
    handler.filters.clear()  # in place, not through removeFilter
    sink(make_record(status=206))
    handler.setFormatter(logging.Formatter("%(message)s %(status)s"))
    sink(make_record(status=207))

    lines = path.read_text().splitlines()
    assert [json.loads(x)["status"] for x in lines[:-1]] == [200, 500, 202, 203, 205, 206]
    assert [json.loads(x).get("service") for x in lines[:-1]] == [None] * 3 + ["api"] * 3
    assert lines[-1] == "Request completed: 207 207"


def test_access_sink_follows_in_place_edits_of_handler_filters(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    (handler,) = sink.logger.handlers
    drop = logging.Filter("nothing")  # passes no record of "t.access"
    edits = [
        lambda: handler.filters.append(drop),
        lambda: handler.filters.remove(drop),
        lambda: handler.filters.insert(0, drop),
        lambda: handler.filters.__delitem__(0),
        lambda: handler.filters.extend([drop]),
        lambda: handler.filters.pop(),
        lambda: handler.filters.__iadd__([drop]),
        lambda: handler.filters.__setitem__(slice(None), []),
        lambda: setattr(handler, "filters", [drop]),
        lambda: handler.filters.clear(),
    ]
    for status, edit in enumerate(edits, 200):
        edit()
        sink(make_record(status=status))

    assert [x["status"] for x in read_lines(path)] == [201, 203, 205, 207, 209]


class LineCollector(logging.Handler):
    """A handler of another package that takes ready lines (not one of sfmon's)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def write_json_line(self, line: str) -> None:
        self.lines.append(line)


def test_access_sink_follows_changes_of_other_line_handlers(tmp_path: Path) -> None:
    logger = logging.getLogger("t.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = LineCollector()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    sink = AccessLogSink(logger, error_logger=None)
    sink(make_record(status=200))
    handler.level = logging.ERROR
    sink(make_record(status=201))
    handler.level = logging.NOTSET
    handler.filters.append(lambda r: True)  # type: ignore[arg-type]
    sink(make_record(status=202))  # through a LogRecord now
    handler.formatter = logging.Formatter("%(message)s")
    sink(make_record(status=203))

    assert [json.loads(x)["status"] for x in handler.lines[:2]] == [200, 202]
    assert handler.lines[2:] == ["Request completed: 203"]


def test_access_sink_follows_propagation_parents_and_disable(tmp_path: Path) -> None:
    parent, parent_path = file_logger(tmp_path, "t")
    child = logging.getLogger("t.x.access")  # "t.x" is only a placeholder so far
    child.setLevel(logging.INFO)
    child.propagate = False
    sink = AccessLogSink(child, error_logger=None)
    mid_path = tmp_path / "mid.log"
    mid = DailyRotatingFileHandler(mid_path)
    mid.setFormatter(JsonFormatter())
    try:
        sink(make_record(status=201))  # nowhere: no handler, lastResort at WARNING
        child.propagate = True
        sink(make_record(status=202))
        middle = logging.getLogger("t.x")  # now a logger between child and parent
        middle.addHandler(mid)
        sink(make_record(status=203))
        logging.disable(logging.INFO)
        sink(make_record(status=204))
        logging.disable(logging.NOTSET)
        parent.setLevel(logging.ERROR)  # the child's level (INFO) still decides
        sink(make_record(status=205))
        child.setLevel(logging.NOTSET)  # now the parent's does
        sink(make_record(status=206))
        sink(make_record(status=507))
    finally:
        logging.disable(logging.NOTSET)
        middle.removeHandler(mid)
        mid.close()
        child.setLevel(logging.NOTSET)
        child.propagate = True

    assert [x["status"] for x in read_lines(parent_path)] == [202, 203, 205, 507]
    assert [x["status"] for x in read_lines(mid_path)] == [203, 205, 507]


def test_access_sink_follows_logger_filters_and_reassignment(tmp_path: Path) -> None:
    sink, path = sink_to_file(tmp_path)
    other, other_path = file_logger(tmp_path, "t.app")
    sink(make_record(status=201))
    sink.logger.filters.append(lambda r: r.status != 202)  # in place
    sink(make_record(status=202))
    sink(make_record(status=203))
    sink.logger.filters.clear()
    sink.logger = other
    sink(make_record(status=204))

    assert [x["status"] for x in read_lines(path)] == [201, 203]
    assert [(x["status"], x["logger"]) for x in read_lines(other_path)] == [(204, "t.app")]


def test_access_sink_follows_dict_config(tmp_path: Path) -> None:
    import logging.config

    configure_logging(log_file=str(tmp_path / "app.log"), stdout=False)
    sink = AccessLogSink(error_logger=None)
    sink(make_record(status=201))
    logging.config.dictConfig(
        {
            "version": 1,
            "incremental": False,
            "disable_existing_loggers": False,
            "formatters": {"json": {"()": "sfmon.logs.JsonFormatter"}},
            "handlers": {
                "file": {
                    "class": "sfmon.logfiles.DailyRotatingFileHandler",
                    "path": str(tmp_path / "new.log"),
                    "formatter": "json",
                }
            },
            "root": {"handlers": ["file"], "level": "INFO"},
        }
    )
    try:
        sink(make_record(status=202))
    finally:
        for h in logging.getLogger().handlers[:]:
            if isinstance(h, DailyRotatingFileHandler) and h.file.path.endswith("new.log"):
                logging.getLogger().removeHandler(h)
                h.close()

    assert [x["status"] for x in read_lines(tmp_path / "new.log")] == [202]
    # dictConfig closed every existing handler (access.log's too, though still attached).
    assert [x["status"] for x in read_lines(tmp_path / "app.log")] == [201]
    assert [x["status"] for x in read_lines(tmp_path / "access.log")] == [201]


# -- configure_logging: destinations, errors, secrets ----------------------------------


def test_configure_logging_destinations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    logger = configure_logging(None, log_file=str(logs / "app.log"))
    sink = AccessLogSink()
    token = current_request_id.set("rid-1")
    try:
        logging.getLogger("some.library").info("inside the request")
        sink(make_record(request_id="rid-1"))
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError as exc:
            sink(
                make_record(
                    request_id="rid-1",
                    status=500,
                    exception="ZeroDivisionError",
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
            )
    finally:
        current_request_id.reset(token)
    logging.getLogger("some.library").error("after the request")

    assert logger is logging.getLogger()
    app = read_lines(logs / "app.log")
    access = read_lines(logs / "access.log")
    errors = read_lines(logs / "errors.log")
    stdout = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["message"] for x in app] == [
        "inside the request",
        "Request completed: 200",
        "Request completed: 500",
        "Unhandled exception: ZeroDivisionError",
        "after the request",
    ]
    assert stdout == app
    assert [x["request_id"] for x in app] == ["rid-1"] * 4 + [None]
    assert [x["message"] for x in access] == ["Request completed: 200", "Request completed: 500"]
    assert errors == app[2:]
    assert errors[1]["logger"] == ERROR_LOGGER
    assert "ZeroDivisionError: division by zero" in errors[1]["exc_info"]
    assert errors[1]["route"] == "/api/coocook/bookings"


def test_configure_logging_is_idempotent(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    for _ in range(3):
        configure_logging(log_file=str(tmp_path / "app.log"), debug=True)

    assert len(root.handlers) == before + 3  # stdout, app.log, errors.log
    assert len(logging.getLogger(ACCESS_LOGGER).handlers) == 1
    assert root.level == logging.DEBUG
    logging.getLogger("t").info("once")
    assert [x["message"] for x in read_lines(tmp_path / "app.log")] == ["once"]


def test_configure_logging_options(tmp_path: Path) -> None:
    configure_logging(
        log_file="main.log",
        log_dir=str(tmp_path / "d"),
        stdout=False,
        access_log=None,
        error_log=str(tmp_path / "elsewhere" / "err.log"),
        retention_days={"app": 3},
        rotate_interval_seconds=3600,
        static_fields={"service": "api"},
    )
    logging.getLogger("t").error("e")

    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".main.log.lock", "main.log"]
    assert read_lines(tmp_path / "elsewhere" / "err.log")[0]["service"] == "api"
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, DailyRotatingFileHandler)]
    assert sorted(h.file.retention or 0 for h in handlers) == [3, 90]
    with pytest.raises(ValueError, match="unknown keys"):
        configure_logging(retention_days={"audit": 365})
    with pytest.raises(ValueError, match="errors"):
        configure_logging(retention_days={"errors": 0})
    with pytest.raises(ValueError, match="rotate_when"):
        configure_logging(rotate_when="hourly")
    with pytest.raises(ValueError, match="rotate_interval_seconds"):
        configure_logging(rotate_interval_seconds=-1)
    # A refused call leaves the previous set-up in place.
    assert [
        h for h in logging.getLogger().handlers if isinstance(h, DailyRotatingFileHandler)
    ] == (handlers)


def test_configure_logging_with_a_flask_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flask = pytest.importorskip("flask")
    from flask.logging import default_handler

    app = flask.Flask("t.app")
    if default_handler not in app.logger.handlers:  # pytest's root handler hides it
        app.logger.addHandler(default_handler)

    logger = configure_logging(app, log_file=str(tmp_path / "app.log"))
    app.logger.warning("from flask")

    assert logger is app.logger
    assert app.logger.handlers == []
    assert [x["logger"] for x in read_lines(tmp_path / "app.log")] == ["t.app"]
    assert capsys.readouterr().err == ""


def test_no_secret_is_ever_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real middleware: headers, query string and body never reach a line."""
    sfmon = pytest.importorskip("sfmon")
    from werkzeug.test import Client

    from sfmon import store

    store.reset_for_tests(str(tmp_path / "store"))
    try:
        configure_logging(log_file=str(tmp_path / "logs" / "app.log"))

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            environ["wsgi.input"].read()
            logging.getLogger("t.app").info("handling")
            if environ["PATH_INFO"] == "/boom":
                raise RuntimeError("failed")
            start_response("200 OK", [("Set-Cookie", "session=SECRET-6")])
            return [b"ok"]

        client = Client(sfmon.Monitor(app, namespace="tlogsecrets"))
        headers = {
            "Authorization": "Bearer SECRET-1",
            "Cookie": "session=SECRET-2",
            "X-Api-Key": "SECRET-3",
            "Proxy-Authorization": "Basic SECRET-7",
        }
        client.post(
            "/login?token=SECRET-4", data="password=SECRET-5", headers=headers, buffered=True
        )
        with pytest.raises(RuntimeError):
            client.get("/boom?access_token=SECRET-8", headers=headers, buffered=True)
    finally:
        store.reset_for_tests(None)

    text = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    text += capsys.readouterr().out
    assert "SECRET" not in text
    lines = read_lines(tmp_path / "logs" / "access.log")
    assert [(x["path"], x["status"]) for x in lines] == [("/login", 200), ("/boom", 500)]


# -- failures and import hygiene ------------------------------------------------------


def test_stdout_failure_is_counted_and_reported_once(capsys: pytest.CaptureFixture[str]) -> None:
    broken = io.StringIO()
    broken.close()
    handler = JsonStreamHandler(broken)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("t")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    sink = AccessLogSink(logger, error_logger=None)

    for _ in range(3):
        logger.info("lost")
        sink(make_record())

    assert log_write_failures() == {"stdout": 6}
    err = capsys.readouterr().err
    assert err.count("sfmon: cannot write log destination 'stdout'") == 1


def test_importing_sfmon_configures_no_logging() -> None:
    code = (
        "import logging, sfmon, sfmon.logs, sfmon.access_log, sfmon.logfiles, "
        "sfmon.gunicorn_logging\n"
        "names = ['', 'sfmon', 'sfmon.access', 'sfmon.errors']\n"
        "print(sum(len(logging.getLogger(n).handlers) for n in names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "0"


def test_failures_feed_the_self_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sfmon import store
    from sfmon.merge import StoreReader

    d = tmp_path / "store"
    d.mkdir()
    store.reset_for_tests(str(d))
    try:
        logfailures.record_write_failure("access.log", OSError(28, "No space left on device"))
        logfailures.record_write_failure("access.log", OSError(28, "No space left on device"))
        family = StoreReader(str(d)).snapshot().families["sfmon_log_write_failures_total"]
    finally:
        store.reset_for_tests(None)

    (labels,) = family.series
    assert labels == ("access.log",)
    value = family.series[labels]
    assert (value[0] if isinstance(value, tuple) else value) / store.VALUE_SCALE == 2
    assert capsys.readouterr().err.count("No space left on device") == 1
