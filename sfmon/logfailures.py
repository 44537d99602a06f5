"""Failed log writes: counted per destination, reported once on stderr, never raised.

Shared by sfmon's log handlers; the counts also feed the
``sfmon_log_write_failures_total{destination}`` self-metric when the store is usable.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["log_write_failures", "record_write_failure"]

_failures: dict[str, int] = {}
_reported: set[str] = set()
_failures_lock = threading.Lock()
_in_failure = threading.local()
_counter: Any = None  # the self-metric once created; False when sfmon.metrics is unusable


def log_write_failures() -> dict[str, int]:
    """Return how many log writes failed in this process, by destination.

    The same counts go to the ``sfmon_log_write_failures_total{destination}`` metric
    when sfmon's metrics store is available.

    .. code-block:: python

        assert sfmon.logs.log_write_failures().get("app.log", 0) == 0
    """
    with _failures_lock:
        return dict(_failures)


def record_write_failure(destination: str, error: BaseException | None, path: str = "") -> None:
    """Count one failed write to *destination*; say so on stderr the first time only.

    Never raises: logging must not fail the request that logs.

    .. code-block:: python

        record_write_failure("stdout", BrokenPipeError(32, "Broken pipe"))
    """
    global _counter
    if getattr(_in_failure, "active", False):
        return  # the metric or stderr write itself logged and failed: do not recurse
    _in_failure.active = True
    try:
        with _failures_lock:
            _failures[destination] = _failures.get(destination, 0) + 1
            first = destination not in _reported
            _reported.add(destination)
        if first:
            where = f" ({path})" if path else ""
            _say(
                f"sfmon: cannot write log destination {destination!r}{where}: {error}; "
                "further failures are only counted (sfmon_log_write_failures_total)\n"
            )
        if _counter is None:
            try:  # imported here so logging works even where the metrics store does not
                from .metrics import counter

                _counter = counter(
                    "sfmon_log_write_failures_total",
                    "Log lines that could not be written, by destination.",
                    ("destination",),
                )
            except Exception:
                _counter = False
        if _counter is not False:
            try:
                _counter.labels(destination).inc()
            except Exception:
                pass
    finally:
        _in_failure.active = False


def _say(text: str) -> None:
    try:
        stream = sys.stderr
        if stream is not None:
            stream.write(text)
            stream.flush()
    except Exception:
        pass
