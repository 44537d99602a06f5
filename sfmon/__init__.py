"""sfmon: production monitoring for any WSGI app.

.. code-block:: python

    import sfmon
    app.wsgi_app = sfmon.Monitor(app.wsgi_app)
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from .checks import dbapi_check, sqlite_check
from .logs import configure_logging
from .metrics import Counter, Gauge, Histogram, counter, gauge, histogram
from .middleware import Monitor
from .record import RequestRecord
from .request_id import get_request_id

__all__ = [
    "Counter",
    "Gauge",
    "Histogram",
    "Monitor",
    "RequestRecord",
    "__version__",
    "configure_logging",
    "counter",
    "dbapi_check",
    "gauge",
    "get_request_id",
    "histogram",
    "sqlite_check",
]
