"""The smallest monitored app: plain WSGI, no framework.

Run: gunicorn -c gunicorn.conf.py --chdir examples plain_wsgi:application
"""

from __future__ import annotations

import sfmon


def hello(environ, start_response):  # type: ignore[no-untyped-def]
    # Tell sfmon the route template so the `path` label stays bounded.
    if environ.get("PATH_INFO", "").startswith("/hello/"):
        environ["sfmon.route"] = "/hello/<name>"
    body = b"hello\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = sfmon.Monitor(hello)
