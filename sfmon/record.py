"""The one record the middleware produces per finished request, handed to every sink."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._accel import speedups

__all__ = ["RequestRecord", "Sink"]

#: The field names, in constructor order.
FIELDS = (
    "request_id",
    "trace_id",
    "method",
    "method_label",
    "path",
    "route",
    "status",
    "content_length",
    "latency_ms",
    "ttfb_ms",
    "started_at",
    "user_id",
    "client_addr",
    "exception",
    "exc_info",
)


class RequestRecord:
    """What a sink learns about one finished request.

    Built once per request by :class:`sfmon.Monitor` when the server closes the
    response (or the app raised). Sinks must treat it as read-only.

    :ivar request_id: the id sent back in ``X-Request-Id``.
    :ivar trace_id: the W3C trace id from ``traceparent``, or ``None``.
    :ivar method: the request method as sent (``REQUEST_METHOD``).
    :ivar method_label: bounded method label (standard methods, else ``_OTHER``).
    :ivar path: the URL path (``SCRIPT_NAME`` + ``PATH_INFO``), no query string.
    :ivar route: the bounded ``path`` label (route template, normalised path,
        the unmatched value, or the overflow value).
    :ivar status: the HTTP status; 500 when the app raised, 499 when the client left.
    :ivar content_length: body bytes the app produced.
    :ivar latency_ms: from the call of the middleware to ``close()``.
    :ivar ttfb_ms: to the first non-empty body chunk, or ``None`` if there was none.
    :ivar started_at: wall-clock start, seconds since the epoch.
    :ivar user_id: ``environ["sfmon.user_id"]`` or ``REMOTE_USER``, else ``None``.
    :ivar client_addr: ``REMOTE_ADDR``.
    :ivar exception: the exception type name when the app raised, else ``None``.
    :ivar exc_info: the ``(type, value, traceback)`` triple when the app raised.

    .. code-block:: python

        def slow_requests(record: RequestRecord) -> None:
            if record.latency_ms > 1000:
                print(record.request_id, record.route)
    """

    __slots__ = FIELDS

    def __init__(
        self,
        request_id: str,
        trace_id: str | None,
        method: str,
        method_label: str,
        path: str,
        route: str,
        status: int,
        content_length: int,
        latency_ms: float,
        ttfb_ms: float | None,
        started_at: float,
        user_id: str | None,
        client_addr: str | None,
        exception: str | None,
        exc_info: tuple[type[BaseException], BaseException, object] | None,
    ) -> None:
        self.request_id = request_id
        self.trace_id = trace_id
        self.method = method
        self.method_label = method_label
        self.path = path
        self.route = route
        self.status = status
        self.content_length = content_length
        self.latency_ms = latency_ms
        self.ttfb_ms = ttfb_ms
        self.started_at = started_at
        self.user_id = user_id
        self.client_addr = client_addr
        self.exception = exception
        self.exc_info = exc_info

    def __repr__(self) -> str:
        return (
            f"RequestRecord({self.method} {self.route} {self.status} "
            f"{self.latency_ms:.3f}ms id={self.request_id})"
        )


#: The pure-Python class (what ``RequestRecord`` is without the C speedups).
PyRequestRecord = RequestRecord

if speedups is not None and not TYPE_CHECKING:
    # The same class with its fields in C: the middleware builds one per request.
    _base: Any = speedups.RecordBase

    class RequestRecord(_base):
        __doc__ = PyRequestRecord.__doc__
        __slots__ = ()
        __repr__ = PyRequestRecord.__repr__


Sink = Callable[[RequestRecord], None]
