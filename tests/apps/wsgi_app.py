"""A plain WSGI app for the gunicorn tests (imports fast, so recycling is cheap).

Not wrapped: gunicorn.conf.py's post_worker_init wraps it (zero-code mode).
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from prometheus_client import Counter

import sfmon

# The app's own prometheus_client metric: multiprocess mode, since gunicorn.conf.py
# exported PROMETHEUS_MULTIPROC_DIR before this module was imported in the worker.
# Labelled, so prometheus_client creates its file only in workers that count something.
pc_events = Counter("app_pc_events", "Events counted with prometheus_client itself", ["kind"])

injected = sfmon.histogram(
    "test_injected_ms", "Known values observed by the test app", native=True
)


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ.get("PATH_INFO", "")
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    ms = float(qs.get("ms", ["0"])[0])
    if path == "/ok":
        environ["sfmon.route"] = "/ok"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    if path == "/slow":
        environ["sfmon.route"] = "/slow"
        time.sleep(ms / 1000)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow\n"]
    if path == "/stream":
        environ["sfmon.route"] = "/stream"

        def body():  # type: ignore[no-untyped-def]
            for i in range(6):
                time.sleep(ms / 6000)
                yield b"chunk %d\n" % i

        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()
    if path == "/pc":
        environ["sfmon.route"] = "/pc"
        pc_events.labels("test").inc()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"counted\n"]
    if path == "/observe":
        environ["sfmon.route"] = "/observe"
        injected.observe(ms)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"observed\n"]
    if path == "/boom":
        environ["sfmon.route"] = "/boom"
        raise RuntimeError("boom")
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
