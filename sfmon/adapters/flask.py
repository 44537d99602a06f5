"""Flask adapter: record the matched URL rule (``/items/<int:id>``) as the route template.

``sfmon.Monitor`` calls :func:`install` on the app it wraps, so Flask apps need no set-up.
Flask is imported only once a Flask-like object is found.
"""

from __future__ import annotations

from typing import Any

from ..routes import UNMATCHED
from . import ROUTE_KEY

__all__ = ["find_flask_app", "install"]

# How many ``.app`` links to follow through wrapping middleware (ProxyFix, Monitor, ...).
_MAX_DEPTH = 8

# flask.request, bound by install(): the hook runs per request and must stay cheap.
_request: Any = None


def _is_flask_like(obj: object) -> bool:
    return hasattr(obj, "url_map") and hasattr(obj, "before_request")


def find_flask_app(app: object) -> Any | None:
    """Return the Flask app behind *app*, or ``None``.

    *app* may be the Flask object, its bound ``wsgi_app`` method, or WSGI middleware
    wrapping either that keeps the wrapped callable in ``.app`` (werkzeug's ``ProxyFix``
    and ``sfmon.Monitor`` do), as in ``app.wsgi_app = ProxyFix(app.wsgi_app)``. Detection
    is by duck typing (``url_map`` and ``before_request``), so nothing is imported.

    :param app: the WSGI callable handed to ``sfmon.Monitor``.

    .. code-block:: python

        find_flask_app(flask_app.wsgi_app) is flask_app  # True
        find_flask_app(plain_wsgi_function)              # None
    """
    obj: object = app
    for _ in range(_MAX_DEPTH):
        if _is_flask_like(obj):
            return obj
        owner = getattr(obj, "__self__", None)  # a bound method: flask_app.wsgi_app
        if owner is not None and _is_flask_like(owner):
            return owner
        obj = getattr(obj, "app", None)
        if obj is None:
            return None
    return None


def _record_route(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # A url_value_preprocessor, not a before_request function: Flask runs every
    # url_value_preprocessor before the first before_request function, so the route is
    # recorded even when a before_request handler answers 401 itself.
    rule = _request.url_rule
    if rule is not None:
        _request.environ[ROUTE_KEY] = rule.rule
    elif getattr(_request.routing_exception, "code", None) in (404, 405):
        # Said explicitly, not left to the status: an auth hook may turn this request
        # into a 401, and scanners' random URLs must still share one label value.
        _request.environ[ROUTE_KEY] = UNMATCHED


def install(app: object) -> bool:
    """Make a Flask app record its matched URL rule in ``environ["sfmon.route"]``.

    Adds a hook that runs for every request of the app and its blueprints, before any
    ``before_request`` function, and stores ``request.url_rule.rule`` (with the
    blueprint's ``url_prefix`` and the converters: ``/api/items/<int:item_id>``). A
    request that matched no rule (Flask's routing raised 404 or 405) gets
    ``"<unmatched>"``, even when a ``before_request`` hook then answers it with another
    status; a strict-slashes redirect leaves the key unset. Idempotent, and safe to call
    after the app has served requests (the hook list is edited directly, not through
    Flask's set-up decorator, which refuses once the first request was handled).

    :param app: a Flask app, its ``wsgi_app`` method, or middleware wrapping either
        (see :func:`find_flask_app`).
    :returns: ``True`` if the hook is installed (now or before), ``False`` if *app* is
        not a Flask app or Flask cannot be imported.

    .. code-block:: python

        from sfmon.adapters import flask as flask_adapter
        flask_adapter.install(app)  # sfmon.Monitor(app.wsgi_app) already does this
    """
    global _request
    flask_app = find_flask_app(app)
    if flask_app is None:
        return False
    try:
        from flask import request
    except ImportError:
        return False
    _request = request
    preprocessors = getattr(flask_app, "url_value_preprocessors", None)
    if not isinstance(preprocessors, dict):
        return False
    # Key None holds the app-wide hooks, which Flask runs for blueprint requests too.
    hooks = preprocessors.setdefault(None, [])
    if _record_route not in hooks:
        # First, so an app's own preprocessor that aborts cannot skip it.
        hooks.insert(0, _record_route)
    try:
        from flask import got_request_exception

        # Flask turns exceptions into 500 responses itself; the signal names the type
        # for sfmon's exception counter (blinker dedupes repeated connects).
        got_request_exception.connect(_record_exception, flask_app, weak=False)
    except ImportError:  # pragma: no cover - signals need blinker, a Flask dependency
        pass
    return True


def _record_exception(sender: object, exception: BaseException, **_extra: object) -> None:
    _request.environ["sfmon.exception"] = type(exception).__name__
