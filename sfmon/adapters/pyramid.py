"""Pyramid adapter: record the matched route's pattern as the route template.

Activate it with ``config.include("sfmon.adapters.pyramid")``.
"""

from __future__ import annotations

from typing import Any

from . import ROUTE_KEY

__all__ = ["includeme", "record_route"]


def record_route(event: Any) -> None:
    """Set ``environ["sfmon.route"]`` from ``request.matched_route`` (a subscriber).

    Subscribed to ``ContextFound``, the first event after URL dispatch. Traversal-only
    requests and requests that matched no route (404) have no ``matched_route`` and
    leave the key unset. A pattern written without a leading slash gets one, as
    Pyramid matches it.

    :param event: a ``pyramid.events.ContextFound`` event.

    .. code-block:: python

        config.add_subscriber(record_route, ContextFound)  # what includeme() does
    """
    request = event.request
    route = getattr(request, "matched_route", None)
    if route is None:
        return
    pattern = route.pattern
    if isinstance(pattern, str) and pattern:
        request.environ[ROUTE_KEY] = pattern if pattern.startswith("/") else "/" + pattern


def includeme(config: Any) -> None:
    """Pyramid include hook: subscribe :func:`record_route` to ``ContextFound``.

    :param config: the ``pyramid.config.Configurator`` being set up.

    .. code-block:: python

        config.include("sfmon.adapters.pyramid")
    """
    from pyramid.events import ContextFound

    config.add_subscriber(record_route, ContextFound)
