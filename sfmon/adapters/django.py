"""Django adapter: a middleware that records the resolved URL pattern as the route template.

Under Django's WSGI handler ``request.META`` *is* the WSGI environ, so the value set here
reaches ``sfmon.Monitor`` wrapping the Django application.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ROUTE_KEY

__all__ = ["RouteMiddleware", "route_of"]


def route_of(resolver_match: Any) -> str | None:
    """Return the route template of a Django ``ResolverMatch``, or ``None``.

    ``resolver_match.route`` is the full pattern, joined through every ``include()``
    (``api/items/<int:item_id>``; the regex for ``re_path``). The root pattern ``""``
    becomes ``"/"``; without a route, the view name (``"shop:item-detail"``) is used.

    :param resolver_match: ``request.resolver_match`` (``None`` before URL resolution).

    .. code-block:: python

        route_of(resolve("/api/items/7"))  # 'api/items/<int:item_id>'
    """
    if resolver_match is None:
        return None
    route = getattr(resolver_match, "route", None)
    if isinstance(route, str):
        return route or "/"
    name = getattr(resolver_match, "view_name", None) or getattr(resolver_match, "url_name", None)
    return name if isinstance(name, str) and name else None


class RouteMiddleware:
    """Django middleware that sets ``request.META["sfmon.route"]`` to the matched pattern.

    The route is set in ``process_view`` (once the URL is resolved, so the view and later
    middleware can read it) and again after the response if an earlier ``process_view``
    answered first. A URL that resolves to nothing (404) leaves it unset, and sfmon
    labels the request ``<unmatched>``. Put it near the top of ``MIDDLEWARE``.

    :param get_response: the next middleware or the view, as Django passes it.

    .. code-block:: python

        MIDDLEWARE = ["sfmon.adapters.django.RouteMiddleware", *MIDDLEWARE]
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = self.get_response(request)
        if ROUTE_KEY not in request.META:
            route = route_of(getattr(request, "resolver_match", None))
            if route is not None:
                request.META[ROUTE_KEY] = route
        return response

    def process_view(
        self,
        request: Any,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> None:
        """Record the resolved route; returns ``None`` so Django carries on to the view."""
        route = route_of(getattr(request, "resolver_match", None))
        if route is not None:
            request.META[ROUTE_KEY] = route
