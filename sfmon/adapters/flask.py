"""Flask adapter: record the matched URL rule (``/items/<int:id>``) as the route template.

``sfmon.Monitor`` calls :func:`install` on the app it wraps, so Flask apps need no set-up.
Flask is imported only once a Flask-like object is found.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from ..routes import UNMATCHED
from . import ROUTE_KEY

__all__ = ["find_flask_app", "install"]

# How many ``.app`` links to follow through wrapping middleware (ProxyFix, Monitor, ...).
_MAX_DEPTH = 8

# flask.request, bound by install(): read only when a request raised.
_request: Any = None

_MISSING = object()

# The app's request class -> its recording subclass, shared by apps with the same class.
_recording: dict[type, type] = {}


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


# -- the request class: routing's own assignments record the route -------------------
#
# Flask's RequestContext.match_request assigns ``request.url_rule`` (and ``view_args``)
# when a rule matched, or ``request.routing_exception`` when none did, before any hook
# runs. Making those two attributes properties of a request subclass records the route
# at that moment: one setter call, and a C-level getter (``attrgetter``, ~50 ns more than
# a plain attribute) for the eight reads Flask makes. 2,000-4,500 CPU instructions a
# request (callgrind, Flask 3.1), where a ``url_value_preprocessor`` took 34,000-38,000
# (~10 % of a bare Flask request): with one, Flask evaluates the ``request.endpoint`` and
# ``request.view_args`` proxies for it, and the hook reads ``flask.request`` through its
# proxy too (each proxy access ~1 µs).


def _set_url_rule(request: Any, rule: Any) -> None:
    request._sfmon_url_rule = rule
    try:
        if rule is not None:
            request.environ[ROUTE_KEY] = rule.rule
    except Exception:  # pragma: no cover - a label must never fail Flask's routing
        pass


def _set_routing_exception(request: Any, exc: Any) -> None:
    request._sfmon_routing_exception = exc
    try:
        if getattr(exc, "code", None) in (404, 405):
            # Said explicitly, not left to the status: an auth hook may turn this request
            # into a 401, and scanners' random URLs must still share one label value. A
            # strict-slashes redirect (308) leaves the key unset.
            request.environ[ROUTE_KEY] = UNMATCHED
    except Exception:  # pragma: no cover - a label must never fail Flask's routing
        pass


_RECORDING_ATTRS: dict[str, object] = {
    "url_rule": property(attrgetter("_sfmon_url_rule"), _set_url_rule),
    "routing_exception": property(attrgetter("_sfmon_routing_exception"), _set_routing_exception),
    "_sfmon_url_rule": None,
    "_sfmon_routing_exception": None,
    "_sfmon_records_route": True,
}


def _class_attr(cls: type, name: str) -> object:
    """*name* as the class defines it (a descriptor itself, not what it returns)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return _MISSING


def _recording_class(cls: object) -> type | None:
    """*cls* itself if it records routes, a recording subclass of it, or ``None`` when
    *cls* is not a request class whose ``url_rule`` and ``routing_exception`` are the plain
    ``None`` defaults of ``flask.Request`` (a user's own property there must stay)."""
    if not isinstance(cls, type):
        return None
    if _class_attr(cls, "_sfmon_records_route") is True:
        return cls
    sub = _recording.get(cls)
    if sub is None:
        if _class_attr(cls, "url_rule") is not None:
            return None
        if _class_attr(cls, "routing_exception") is not None:
            return None
        namespace = {
            **_RECORDING_ATTRS,
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        try:
            # The same name, so werkzeug's repr (``<Request 'http://...' [GET]>``) and
            # logs that print the class name do not change.
            sub = type(cls.__name__, (cls,), namespace)
        except Exception:
            return None
        _recording[cls] = sub
    return sub


def _use_recording_class(flask_app: Any) -> bool:
    recording = _recording_class(getattr(flask_app, "request_class", None))
    if recording is None:
        return False
    if flask_app.request_class is not recording:
        try:
            flask_app.request_class = recording
        except Exception:  # a read-only property on an app subclass
            return False
    return flask_app.request_class is recording


# -- the fallback: a url_value_preprocessor ------------------------------------------


def _record_route(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # Used only when the request class cannot be replaced. A url_value_preprocessor, not a
    # before_request function: Flask runs every url_value_preprocessor before the first
    # before_request function, so the route is recorded even when a before_request
    # handler answers 401 itself.
    rule = _request.url_rule
    if rule is not None:
        _request.environ[ROUTE_KEY] = rule.rule
    elif getattr(_request.routing_exception, "code", None) in (404, 405):
        _request.environ[ROUTE_KEY] = UNMATCHED


def _add_hook(flask_app: Any) -> bool:
    preprocessors = getattr(flask_app, "url_value_preprocessors", None)
    if not isinstance(preprocessors, dict):
        return False
    # Key None holds the app-wide hooks, which Flask runs for blueprint requests too.
    hooks = preprocessors.setdefault(None, [])
    if _record_route not in hooks:
        # First, so an app's own preprocessor that aborts cannot skip it.
        hooks.insert(0, _record_route)
    return True


def install(app: object) -> bool:
    """Make a Flask app record its matched URL rule in ``environ["sfmon.route"]``.

    Stores ``request.url_rule.rule`` (with the blueprint's ``url_prefix`` and the
    converters: ``/api/items/<int:item_id>``) when Flask's routing matches the request,
    before any ``before_request`` function or ``url_value_preprocessor`` runs. A request
    that matched no rule (Flask's routing raised 404 or 405) gets ``"<unmatched>"``, even
    when a ``before_request`` hook then answers it with another status; a strict-slashes
    redirect leaves the key unset.

    It does so by setting ``app.request_class`` to a subclass of the app's request class
    (``flask.Request`` or the app's own) that records the route when Flask assigns
    ``request.url_rule`` or ``request.routing_exception``: no per-request hook, which
    would cost ~10× more. If the request class defines either attribute itself, a
    ``url_value_preprocessor`` does the same instead. A ``request_class`` assigned after
    this call replaces the recording one: call :func:`install` again then. Idempotent,
    and safe to call after the app has served requests (nothing goes through Flask's
    set-up decorators, which refuse once the first request was handled).

    :param app: a Flask app, its ``wsgi_app`` method, or middleware wrapping either
        (see :func:`find_flask_app`).
    :returns: ``True`` if the route is recorded (from now or before), ``False`` if *app*
        is not a Flask app or Flask cannot be imported.

    .. code-block:: python

        from sfmon.adapters import flask as flask_adapter
        flask_adapter.install(app)  # sfmon.Monitor(app.wsgi_app) already does this
        app.request_class           # <class 'sfmon.adapters.flask.Request'>
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
    if not _use_recording_class(flask_app) and not _add_hook(flask_app):
        return False
    try:
        from flask import got_request_exception

        # Flask turns exceptions into 500 responses itself; the signal names the type
        # for sfmon's exception counter (blinker dedupes repeated connects). Sent only
        # for a request that raised: nothing is paid on the others.
        got_request_exception.connect(_record_exception, flask_app, weak=False)
    except (ImportError, RuntimeError):
        # Flask < 2.3 without blinker (a dependency only since 2.3) raises RuntimeError
        # on connect: the route is still recorded, the exception type is not.
        pass
    return True


def _record_exception(sender: object, exception: BaseException, **_extra: object) -> None:
    _request.environ["sfmon.exception"] = type(exception).__name__
