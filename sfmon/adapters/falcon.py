"""Falcon adapter: a middleware component that records ``req.uri_template`` as the route.

Needs Falcon 3 or later (``Request.uri_template``); nothing from Falcon is imported.
"""

from __future__ import annotations

from typing import Any

from . import ROUTE_KEY

__all__ = ["RouteMiddleware"]


class RouteMiddleware:
    """Falcon middleware that sets ``req.env["sfmon.route"]`` to the matched URI template.

    The template (``/api/items/{item_id}``) is recorded when a resource matched: in
    ``process_resource``, and again in ``process_response`` in case another component's
    ``process_resource`` finished the response first. Unrouted requests leave it unset.

    .. code-block:: python

        app = falcon.App(middleware=[sfmon.adapters.falcon.RouteMiddleware()])
    """

    def process_resource(self, req: Any, resp: Any, resource: object, params: Any) -> None:
        """Record the template of the resource Falcon routed *req* to."""
        template = req.uri_template
        if template:
            req.env[ROUTE_KEY] = template

    def process_response(self, req: Any, resp: Any, resource: object, req_succeeded: bool) -> None:
        """Record the template if ``process_resource`` did not (``resource`` is ``None``
        when nothing matched)."""
        if resource is not None and ROUTE_KEY not in req.env:
            template = getattr(req, "uri_template", None)
            if template:
                req.env[ROUTE_KEY] = template
