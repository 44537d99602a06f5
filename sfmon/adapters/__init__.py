"""Framework adapters that put the matched route template in ``environ["sfmon.route"]``.

Each adapter lives in its own module and imports its framework only there, so importing
``sfmon`` never imports a web framework. Flask needs no set-up (``sfmon.Monitor`` calls
:func:`sfmon.adapters.flask.install`); the others are one line each, see ``docs/routes.md``.
"""

from __future__ import annotations

#: The environ key every adapter sets, and that ``sfmon.Monitor`` reads when a request ends.
ROUTE_KEY = "sfmon.route"

__all__ = ["ROUTE_KEY"]
