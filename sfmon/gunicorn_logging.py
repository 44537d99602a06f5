"""A gunicorn ``logger_class`` that writes gunicorn's error log as sfmon JSON lines.

Access lines are sfmon's job (one per request, from the middleware), so this logger
never writes gunicorn's own access line.
"""

from __future__ import annotations

import logging
import logging.handlers
from typing import Any

from gunicorn import glogging

from .logs import JsonFormatter, RequestContextFilter

__all__ = ["JsonGunicornLogger"]


class JsonGunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's ``Logger`` with JSON error lines and no access lines.

    Every handler of the ``gunicorn.error`` logger (the ``--error-logfile``, stderr by
    default, and those of a ``logconfig_dict``) gets sfmon's
    :class:`~sfmon.logs.JsonFormatter` and request-context filter, so lines have the
    same shape as the application's: ``{"timestamp": ..., "level": "INFO", "logger":
    "gunicorn.error", "message": "Booting worker with pid: 42", "request_id": null}``.
    Syslog handlers keep their format. :meth:`access` does nothing and
    ``access_log_enabled`` is false, so gunicorn neither builds nor writes access lines
    even when ``accesslog`` is set. gunicorn's records do not propagate to the root
    logger (gunicorn's choice), so they stay out of ``app.log``.

    .. code-block:: python

        # gunicorn.conf.py
        logger_class = "sfmon.gunicorn_logging.JsonGunicornLogger"
        accesslog = None
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # also re-run by gunicorn on SIGHUP: keep this idempotent
        formatter = JsonFormatter()
        context = RequestContextFilter()
        for handler in self.error_log.handlers:
            if isinstance(handler, logging.handlers.SysLogHandler):
                continue
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(formatter)
            if not any(isinstance(f, RequestContextFilter) for f in handler.filters):
                handler.addFilter(context)
        for handler in list(self.access_log.handlers):
            if getattr(handler, "_gunicorn", False):
                self.access_log.removeHandler(handler)
                handler.close()
        self._access_log_enabled = False

    @property
    def access_log_enabled(self) -> bool:
        """Always false: sfmon writes the access line itself."""
        return False

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """Do nothing: sfmon's middleware writes one access line per request."""
        return None
