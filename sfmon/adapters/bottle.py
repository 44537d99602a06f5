"""Bottle adapter: a plugin that records the matched route's rule as the route template.

Activate it with ``app.install(RoutePlugin())``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from . import ROUTE_KEY

__all__ = ["RoutePlugin"]


class RoutePlugin:
    """Bottle plugin (API 2) that sets ``environ["sfmon.route"]`` to ``route.rule``.

    Each route's callback is wrapped to store its rule (``/api/items/<item_id:int>``)
    before it runs, so the value is set even when the callback raises. Requests that
    matched no route (404/405) never reach a callback and leave the key unset. A Bottle
    app mounted with ``parent.mount("/prefix/", child)`` keeps its own plugins: install
    the plugin on the child too (its rules then include the prefix).

    .. code-block:: python

        app = bottle.Bottle()
        app.install(RoutePlugin())
    """

    name = "sfmon_route"
    api = 2

    def apply(self, callback: Callable[..., Any], route: Any) -> Callable[..., Any]:
        """Return *callback* wrapped to record ``route.rule`` for each call.

        :param callback: the route's callback, possibly already wrapped by other plugins.
        :param route: the ``bottle.Route`` being built.
        """
        from bottle import request

        rule = route.rule

        @functools.wraps(callback)
        def record_route(*args: Any, **kwargs: Any) -> Any:
            request.environ[ROUTE_KEY] = rule
            return callback(*args, **kwargs)

        return record_route
