"""gunicorn's error log as sfmon JSON lines, and no gunicorn access lines."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.config import Config
from support import ROOT, Proc, free_port, gunicorn_bin, http_get, wait_http

from sfmon.gunicorn_logging import JsonGunicornLogger
from sfmon.logs import JsonFormatter, RequestContextFilter
from sfmon.request_id import current_request_id


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """gunicorn's Logger (and a logconfig_dict) rewire these loggers; put them back."""
    names = ["", "gunicorn.error", "gunicorn.access"]
    saved = {
        n: (list(lg.handlers), lg.level, lg.propagate)
        for n in names
        for lg in [logging.getLogger(n)]
    }
    yield
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate


def make_logger(tmp_path: Path, **settings: Any) -> JsonGunicornLogger:
    cfg = Config()
    cfg.set("errorlog", str(tmp_path / "error.log"))
    for key, value in settings.items():
        cfg.set(key, value)
    return JsonGunicornLogger(cfg)


def read_lines(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f]


def close(log: JsonGunicornLogger) -> None:
    for h in log.error_log.handlers + log.access_log.handlers:
        h.flush()


def test_error_log_lines_are_json(tmp_path: Path) -> None:
    log = make_logger(tmp_path)
    log.info("Booting worker with pid: %s", 42)
    token = current_request_id.set("rid-7")
    try:
        try:
            raise OSError("socket closed")
        except OSError:
            log.exception("Error handling request /x")
    finally:
        current_request_id.reset(token)
    close(log)

    boot, error = read_lines(tmp_path / "error.log")
    assert list(boot)[:5] == ["timestamp", "level", "logger", "message", "request_id"]
    assert (boot["level"], boot["logger"], boot["message"]) == (
        "INFO",
        "gunicorn.error",
        "Booting worker with pid: 42",
    )
    assert boot["request_id"] is None
    assert (error["level"], error["request_id"]) == ("ERROR", "rid-7")
    assert "OSError: socket closed" in error["exc_info"]


def test_access_writes_nothing_even_when_accesslog_is_set(tmp_path: Path) -> None:
    log = make_logger(tmp_path, accesslog=str(tmp_path / "access.log"))
    resp = SimpleNamespace(status="200 OK", sent=2, headers=[], response_length=2)
    req = SimpleNamespace(headers=[], method="GET", path="/", query="", version=(1, 1))
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "RAW_URI": "/"}

    log.access(resp, req, environ, 0.01)
    close(log)

    assert log.access_log_enabled is False
    assert log.access_log.handlers == []
    assert not (tmp_path / "access.log").exists() or (tmp_path / "access.log").read_text() == ""


def test_setup_again_is_idempotent(tmp_path: Path) -> None:
    """gunicorn re-runs setup() on SIGHUP."""
    log = make_logger(tmp_path)
    log.setup(log.cfg)
    log.setup(log.cfg)

    (handler,) = log.error_log.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert [type(f) for f in handler.filters] == [RequestContextFilter]


def test_logconfig_dict_handlers_become_json(tmp_path: Path) -> None:
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": "INFO", "handlers": []},  # the merge with gunicorn's is shallow
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(tmp_path / "dict.log"),
                "formatter": "generic",
            }
        },
        "formatters": {"generic": {"format": "%(asctime)s [%(levelname)s] %(message)s"}},
        "loggers": {"gunicorn.error": {"level": "INFO", "handlers": ["file"], "propagate": False}},
    }
    log = make_logger(tmp_path, logconfig_dict=config)
    log.warning("Worker with pid %s was terminated due to signal %s", 9, 9)
    close(log)

    (line,) = read_lines(tmp_path / "dict.log")
    assert line["message"] == "Worker with pid 9 was terminated due to signal 9"
    assert line["level"] == "WARNING"


APP = """
def app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


@pytest.mark.integration
def test_real_gunicorn_error_log_is_json_and_access_log_empty(tmp_path: Path) -> None:
    (tmp_path / "tapp.py").write_text(APP)
    port = free_port()
    args = [
        gunicorn_bin(),
        "--chdir",
        str(tmp_path),
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        "2",
        "--logger-class",
        "sfmon.gunicorn_logging.JsonGunicornLogger",
        "--error-logfile",
        str(tmp_path / "error.log"),
        "--access-logfile",
        str(tmp_path / "access.log"),
        "tapp:app",
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    proc = Proc(args, cwd=tmp_path, env=env, log=tmp_path / "out.txt")
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc=proc)
        for path in ["/", "/a%5Cb", "/x%09y", "/x%0Ay%0D%0A", "/caf%C3%A9", "/boom"]:
            status, _, _ = http_get(f"http://127.0.0.1:{port}{path}")
            assert status in (200, 500)
    finally:
        proc.stop(signal.SIGTERM)

    lines = read_lines(tmp_path / "error.log")
    messages = [x["message"] for x in lines]
    assert any(m.startswith("Booting worker with pid") for m in messages)
    assert any("RuntimeError: boom" in x.get("exc_info", "") for x in lines)
    assert all(x["logger"] == "gunicorn.error" for x in lines)
    assert (tmp_path / "access.log").read_text() == ""
