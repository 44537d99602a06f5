# gunicorn.conf.py: settings only; the logic lives in sfmon.gunicorn_hooks (installed,
# typed, tested). Works for any app:  gunicorn -c gunicorn.conf.py pkg.module:app
# Command-line flags (-w, -b, --max-requests, ...) override these as usual.
import os

from sfmon.gunicorn_hooks import (  # noqa: F401  (gunicorn looks these names up)
    child_exit,
    on_exit,
    on_starting,
    post_worker_init,
    when_ready,
)

# -- Server socket ----------------------------------------------------------------------
bind = os.environ.get("SFMON_BIND", "127.0.0.1:8000")

# -- Workers ----------------------------------------------------------------------------
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = os.environ.get("SFMON_WORKER_CLASS", "sync")
threads = int(os.environ.get("SFMON_THREADS", "1"))
timeout = 30
graceful_timeout = 20
max_requests = int(os.environ.get("SFMON_MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("SFMON_MAX_REQUESTS_JITTER", "0"))

# -- Logging ----------------------------------------------------------------------------
# sfmon writes one JSON access line per request itself, so gunicorn's access log is off.
accesslog = None
errorlog = "-"
logger_class = "sfmon.gunicorn_logging.JsonGunicornLogger"  # gunicorn's own lines as JSON
loglevel = os.environ.get("SFMON_LOG_LEVEL", "info")
