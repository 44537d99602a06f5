"""Framework adapters, each on a real tiny app: the route template reaches the WSGI environ.

Every app is wrapped in ``Capture``, a WSGI middleware that reads ``environ["sfmon.route"]``
when the server closes the body, which is when ``sfmon.Monitor`` reads it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.validate import validator

import pytest
from werkzeug.test import Client

import sfmon.adapters
from sfmon.adapters import ROUTE_KEY
from sfmon.routes import UNMATCHED

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

UNSET = "<unset>"


class _ClosingBody:
    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._body = body
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


class Capture:
    """WSGI middleware recording ``(status, environ.get("sfmon.route"))`` at ``close()``."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.seen: list[tuple[int, str]] = []

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        status: list[int] = []

        def capture_start(code: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(int(code.split(" ", 1)[0]))
            return start_response(code, headers, exc_info)

        body = self.app(environ, capture_start)
        return _ClosingBody(
            body, lambda: self.seen.append((status[-1], environ.get(ROUTE_KEY, UNSET)))
        )


def drive(app: WSGIApplication, *urls: str, method: str = "GET") -> list[tuple[int, str]]:
    """Request each URL through ``Capture`` (bodies read and closed, as a server does)."""
    capture = Capture(validator(app))
    client = Client(validator(capture))
    for url in urls:
        client.open(url, method=method, buffered=True)
    return capture.seen


ITEM_URLS = [f"/api/items/{i * 7919}" for i in range(100)]


def test_adapters_package_imports_no_framework() -> None:
    """``import sfmon`` must stay cheap for apps that use none of these frameworks."""
    code = (
        "import sys, sfmon.adapters, sfmon.routes; "
        "print(sorted({'flask', 'django', 'falcon', 'pyramid', 'bottle'} & set(sys.modules)))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"
    assert sfmon.adapters.ROUTE_KEY == "sfmon.route"


# -- Flask ---------------------------------------------------------------------------


def _flask_app() -> Any:
    import flask

    app = flask.Flask("sfmon_test_flask")

    @app.get("/api/items/<int:item_id>")
    def item(item_id: int) -> str:
        if item_id == 404:
            flask.abort(404)  # matched route, app-level 404: the template is kept
        return str(item_id)

    @app.get("/api/health")
    def health() -> str:
        return "ok"

    bp = flask.Blueprint("things", __name__, url_prefix="/bp")

    @bp.get("/things/<uuid:thing_id>")
    def thing(thing_id: object) -> str:
        return str(thing_id)

    app.register_blueprint(bp)
    return app


def test_flask_templates() -> None:
    from sfmon.adapters import flask as adapter

    app = _flask_app()
    assert adapter.install(app) is True

    seen = drive(
        app,
        "/api/items/1",
        "/api/health",
        "/bp/things/550e8400-e29b-41d4-a716-446655440000",
        "/api/items/404",
    )

    assert seen == [
        (200, "/api/items/<int:item_id>"),
        (200, "/api/health"),
        (200, "/bp/things/<uuid:thing_id>"),
        (404, "/api/items/<int:item_id>"),
    ]


def test_flask_hundred_ids_one_value_and_unmatched_unset() -> None:
    from sfmon.adapters import flask as adapter

    app = _flask_app()
    adapter.install(app)

    seen = drive(app, *ITEM_URLS, "/nope/1", "/api/items/not-an-int")
    seen += drive(app, "/api/health", method="POST")
    seen += drive(app, "/bp/things/")  # no rule; a redirect would be a routing exception too

    assert {s for s in seen[:100]} == {(200, "/api/items/<int:item_id>")}
    assert seen[100:] == [(404, UNMATCHED), (404, UNMATCHED), (405, UNMATCHED), (404, UNMATCHED)]


def test_flask_strict_slashes_redirect_leaves_route_unset() -> None:
    import flask

    from sfmon.adapters import flask as adapter

    app = flask.Flask("sfmon_test_flask_slashes")
    app.add_url_rule("/docs/", "docs", lambda: "docs")
    adapter.install(app)

    seen = drive(app, "/docs", "/docs/")

    assert seen == [(308, UNSET), (200, "/docs/")]


def test_flask_route_set_when_before_request_aborts() -> None:
    """An auth hook answering 401 runs after the route is recorded, whatever the order."""
    import flask

    from sfmon.adapters import flask as adapter

    app = _flask_app()

    @app.before_request
    def deny() -> None:
        flask.abort(401)

    @app.url_value_preprocessor
    def deny_too(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values and values.get("item_id") == 2:
            flask.abort(403)

    adapter.install(app)

    seen = drive(
        app,
        "/api/items/1",
        "/api/items/2",
        "/bp/things/550e8400-e29b-41d4-a716-446655440000",
        "/random/probe/1",
    )

    assert seen == [
        (401, "/api/items/<int:item_id>"),
        (403, "/api/items/<int:item_id>"),
        (401, "/bp/things/<uuid:thing_id>"),
        (401, UNMATCHED),  # the hook answered, but routing had already failed
    ]


def test_flask_install_through_wsgi_app_and_wrappers() -> None:
    """``app.wsgi_app = X(app.wsgi_app)`` in either order, as the README shows."""
    import flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from sfmon.adapters import flask as adapter

    app = _flask_app()
    app.wsgi_app = ProxyFix(app.wsgi_app)  # type: ignore[method-assign]
    assert adapter.install(app.wsgi_app) is True  # ProxyFix -> .app -> bound method
    app.wsgi_app = Capture(app.wsgi_app)  # type: ignore[method-assign]
    assert adapter.install(app.wsgi_app) is True  # Capture -> ProxyFix -> bound method
    assert adapter.install(app.wsgi_app.app.app) is True  # the bound method itself

    Client(app).get("/api/items/5", buffered=True)

    assert app.wsgi_app.seen == [(200, "/api/items/<int:item_id>")]
    assert app.request_class.__mro__[1] is flask.Request  # wrapped once


def test_flask_install_is_idempotent_and_adds_no_hook() -> None:
    """The route comes from the request class: no per-request hook (~10x the cost)."""
    import flask

    from sfmon.adapters import flask as adapter

    app = _flask_app()
    app.url_value_preprocessor(lambda endpoint, values: None)
    other = _flask_app()

    results = [adapter.install(app), adapter.install(app), adapter.install(app.wsgi_app)]
    adapter.install(other)

    assert results == [True, True, True]
    assert app.request_class.__mro__[1] is flask.Request
    assert app.request_class.__name__ == "Request"  # werkzeug's repr is unchanged
    assert other.request_class is app.request_class  # one subclass per request class
    assert len(app.url_value_preprocessors[None]) == 1  # only the app's own
    assert adapter._record_route not in other.url_value_preprocessors.get(None, [])
    assert flask.Flask.request_class is flask.Request  # the class attribute is untouched


def test_flask_install_after_first_request() -> None:
    """Flask refuses set-up decorators after the first request; install still works."""
    from sfmon.adapters import flask as adapter

    app = _flask_app()
    Client(app).get("/api/health", buffered=True)

    assert adapter.install(app) is True
    assert drive(app, "/api/items/3") == [(200, "/api/items/<int:item_id>")]


def test_flask_custom_request_class_is_subclassed() -> None:
    """The app's own request class keeps working: sfmon's class derives from it."""
    import flask

    from sfmon.adapters import flask as adapter

    class MyRequest(flask.Request):
        def tenant(self) -> str:
            return self.headers.get("X-Tenant", "none")

    app = _flask_app()
    app.request_class = MyRequest

    @app.get("/whoami/<name>")
    def whoami(name: str) -> str:
        req = flask.request
        assert isinstance(req, MyRequest) and req.routing_exception is None
        return f"{req.tenant()} {req.endpoint} {req.url_rule} {req.view_args}"

    assert adapter.install(app) is True
    response = Client(app).get("/whoami/bob", headers={"X-Tenant": "acme"})
    seen = drive(app, "/whoami/bob", "/nope")

    assert app.request_class.__mro__[1] is MyRequest
    assert response.get_data(as_text=True) == "acme whoami /whoami/<name> {'name': 'bob'}"
    assert seen == [(200, "/whoami/<name>"), (404, UNMATCHED)]

    # A request class set after install replaces sfmon's: installing again wraps it.
    app.request_class = MyRequest
    assert adapter.install(app) is True
    assert drive(app, "/whoami/bob") == [(200, "/whoami/<name>")]


def test_flask_request_class_with_its_own_url_rule_gets_the_hook() -> None:
    """A request class that defines url_rule itself is left alone; a hook records."""
    import flask

    from sfmon.adapters import flask as adapter

    class OwnRule(flask.Request):
        @property
        def url_rule(self) -> Any:
            return self.__dict__.get("_rule")

        @url_rule.setter
        def url_rule(self, rule: Any) -> None:
            self.__dict__["_rule"] = rule

    app = _flask_app()
    app.request_class = OwnRule

    @app.before_request
    def deny() -> None:
        flask.abort(401)

    assert adapter.install(app) is True
    assert adapter.install(app) is True

    assert app.request_class is OwnRule
    assert app.url_value_preprocessors[None] == [adapter._record_route]
    assert drive(app, "/api/items/1", "/bp/things/550e8400-e29b-41d4-a716-446655440000") == [
        (401, "/api/items/<int:item_id>"),
        (401, "/bp/things/<uuid:thing_id>"),
    ]
    assert drive(app, "/random/probe/1", "/api/health", method="POST") == [
        (401, UNMATCHED),
        (401, UNMATCHED),
    ]


def test_flask_read_only_request_class_gets_the_hook() -> None:
    import flask

    from sfmon.adapters import flask as adapter

    class Locked(flask.Flask):
        @property
        def request_class(self) -> type[flask.Request]:  # type: ignore[override]
            return flask.Request

    app = Locked("sfmon_test_flask_locked")
    app.add_url_rule("/items/<int:n>", "item", lambda n: str(n))

    assert adapter.install(app) is True
    assert app.url_value_preprocessors[None] == [adapter._record_route]
    assert drive(app, "/items/1", "/nope") == [(200, "/items/<int:n>"), (404, UNMATCHED)]


def test_flask_nested_and_repeated_blueprints_keep_their_prefixes() -> None:
    import flask

    from sfmon.adapters import flask as adapter

    app = flask.Flask("sfmon_test_flask_blueprints")
    api = flask.Blueprint("api", __name__, url_prefix="/api")
    v2 = flask.Blueprint("v2", __name__, url_prefix="/v2")

    @v2.get("/things/<int:thing_id>")
    def thing(thing_id: int) -> str:
        return str(thing_id)

    @v2.before_request
    def deny_seven() -> None:
        if flask.request.view_args == {"thing_id": 7}:
            flask.abort(403)

    api.register_blueprint(v2)
    app.register_blueprint(api)
    app.register_blueprint(api, url_prefix="/legacy", name="legacy")
    adapter.install(app)

    seen = drive(app, "/api/v2/things/1", "/legacy/v2/things/2", "/api/v2/things/7")
    seen += drive(app, "/api/v2/things/x", "/api/v2/things/1", method="DELETE")

    assert seen == [
        (200, "/api/v2/things/<int:thing_id>"),
        (200, "/legacy/v2/things/<int:thing_id>"),
        (403, "/api/v2/things/<int:thing_id>"),
        (404, UNMATCHED),
        (405, UNMATCHED),
    ]


def test_flask_exception_type_reaches_environ() -> None:
    """Flask answers 500 itself; its got_request_exception signal names the type."""
    import flask

    from sfmon.adapters import flask as adapter

    app = flask.Flask("sfmon_test_flask_exception")
    environs: list[dict[str, Any]] = []

    @app.get("/boom/<int:n>")
    def boom(n: int) -> str:
        environs.append(flask.request.environ)
        return str(1 // n)

    adapter.install(app)
    statuses = [Client(app).get(url).status_code for url in ("/boom/1", "/boom/0")]

    assert statuses == [200, 500]
    assert [e.get("sfmon.exception") for e in environs] == [None, "ZeroDivisionError"]
    assert [e.get(ROUTE_KEY) for e in environs] == ["/boom/<int:n>"] * 2


def test_flask_without_signals_still_records_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flask < 2.3 without blinker refuses to connect signals: install must not fail."""
    import flask

    from sfmon.adapters import flask as adapter

    class NoSignal:
        def connect(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("Signalling support is unavailable")

    monkeypatch.setattr(flask, "got_request_exception", NoSignal())
    app = _flask_app()

    assert adapter.install(app) is True
    assert drive(app, "/api/items/1") == [(200, "/api/items/<int:item_id>")]


def _plain_wsgi(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


class _Wrapper:
    def __init__(self, app: object) -> None:
        self.app = app


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(_plain_wsgi, id="function"),
        pytest.param(_Wrapper(_plain_wsgi), id="wrapped-function"),
        pytest.param(_Wrapper(None), id="wrapper-of-none"),
        pytest.param(types.SimpleNamespace(url_map=1), id="half-flask"),
        pytest.param(object(), id="object"),
        pytest.param(None, id="none"),
    ],
)
def test_flask_install_ignores_non_flask(obj: object) -> None:
    from sfmon.adapters import flask as adapter

    assert adapter.install(obj) is False


def test_flask_find_app_stops_on_cycles() -> None:
    from sfmon.adapters import flask as adapter

    loop = _Wrapper(None)
    loop.app = loop

    assert adapter.find_flask_app(loop) is None


# -- Django --------------------------------------------------------------------------

DJANGO_URLCONF = "sfmon_test_adapters_django_urls"


@pytest.fixture(scope="module")
def django_app() -> Any:
    import django
    from django.conf import settings
    from django.http import Http404, HttpResponse
    from django.test.utils import override_settings
    from django.urls import include, path, re_path

    def item(request: Any, item_id: int) -> HttpResponse:
        if item_id == 404:
            raise Http404("no such item")
        return HttpResponse(str(item_id))

    def plain(request: Any, **kwargs: Any) -> HttpResponse:
        return HttpResponse("ok")

    shop = (
        [
            path("items/<slug:slug>", plain, name="item"),
            re_path(r"^legacy/(?P<pk>[0-9]+)/$", plain, name="legacy"),
        ],
        "shop",
    )
    urls = types.ModuleType(DJANGO_URLCONF)
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("", plain),
        path("api/items/<int:item_id>", item),
        path("api/health", plain),
        path("shop/", include(shop, namespace="shop")),
    ]
    sys.modules[DJANGO_URLCONF] = urls

    # Another test module may have configured Django first: configure only once, and
    # apply this module's needs as an override either way.
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="sfmon-tests",
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    overrides = override_settings(
        ROOT_URLCONF=DJANGO_URLCONF,
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=["sfmon.adapters.django.RouteMiddleware"],
    )
    overrides.enable()
    try:
        from django.core.handlers.wsgi import WSGIHandler

        yield WSGIHandler()  # loads MIDDLEWARE now, under the override
    finally:
        overrides.disable()
        sys.modules.pop(DJANGO_URLCONF, None)


def test_django_templates(django_app: Any) -> None:
    seen = drive(
        django_app,
        "/api/items/1",
        "/api/health",
        "/shop/items/red-shoes",
        "/shop/legacy/12/",
        "/",
        "/api/items/404",
    )

    assert seen == [
        (200, "api/items/<int:item_id>"),
        (200, "api/health"),
        (200, "shop/items/<slug:slug>"),
        (200, "shop/legacy/(?P<pk>[0-9]+)/$"),
        (200, "/"),
        (404, "api/items/<int:item_id>"),
    ]


def test_django_hundred_ids_one_value_and_unmatched_unset(django_app: Any) -> None:
    seen = drive(django_app, *ITEM_URLS, "/nope/1", "/api/items/x")

    assert {s for s in seen[:100]} == {(200, "api/items/<int:item_id>")}
    assert seen[100:] == [(404, UNSET), (404, UNSET)]


def test_django_route_set_when_an_earlier_process_view_answers() -> None:
    from sfmon.adapters.django import RouteMiddleware

    match = types.SimpleNamespace(route="api/items/<int:item_id>")
    request = types.SimpleNamespace(META={}, resolver_match=None)

    def get_response(req: Any) -> str:
        req.resolver_match = match  # resolved, but our process_view never ran
        return "response"

    response = RouteMiddleware(get_response)(request)

    assert response == "response"
    assert request.META == {ROUTE_KEY: "api/items/<int:item_id>"}


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        pytest.param(None, None, id="unresolved"),
        pytest.param(types.SimpleNamespace(route="a/<int:x>"), "a/<int:x>", id="route"),
        pytest.param(types.SimpleNamespace(route=""), "/", id="root"),
        pytest.param(
            types.SimpleNamespace(route=None, view_name="shop:item", url_name="item"),
            "shop:item",
            id="view-name",
        ),
        pytest.param(
            types.SimpleNamespace(route=None, view_name="", url_name=None), None, id="nothing"
        ),
    ],
)
def test_django_route_of(match: object, expected: str | None) -> None:
    from sfmon.adapters.django import route_of

    assert route_of(match) == expected


# -- Falcon --------------------------------------------------------------------------


def _falcon_app(*extra_middleware: object) -> Any:
    import falcon

    from sfmon.adapters.falcon import RouteMiddleware

    class Item:
        def on_get(self, req: Any, resp: Any, item_id: str) -> None:
            resp.text = item_id

    class Health:
        def on_get(self, req: Any, resp: Any) -> None:
            resp.text = "ok"

    app = falcon.App(middleware=[*extra_middleware, RouteMiddleware()])
    app.add_route("/api/items/{item_id}", Item())
    app.add_route("/api/health", Health())
    return app


def test_falcon_templates_hundred_ids_and_unmatched() -> None:
    app = _falcon_app()

    seen = drive(app, "/api/health", *ITEM_URLS, "/nope/1")
    seen += drive(app, "/api/health", method="POST")

    assert seen[0] == (200, "/api/health")
    assert set(seen[1:101]) == {(200, "/api/items/{item_id}")}
    assert seen[101] == (404, UNSET)
    assert seen[102] == (405, "/api/health")  # routed; the resource lacks the responder


def test_falcon_route_set_when_earlier_component_completes_response() -> None:
    import falcon

    class Deny:
        def process_resource(self, req: Any, resp: Any, resource: object, params: Any) -> None:
            resp.status = falcon.HTTP_401
            resp.complete = True  # later process_resource methods are skipped

    seen = drive(_falcon_app(Deny()), "/api/items/9")

    assert seen == [(401, "/api/items/{item_id}")]


# -- Pyramid -------------------------------------------------------------------------

# webob (pyramid's request library) imports the deprecated ``cgi`` module on Python
# 3.11/3.12; tox.ini only ignores DeprecationWarnings raised from pyramid itself.
_webob_cgi = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")


def _pyramid_app() -> Any:
    from pyramid.config import Configurator
    from pyramid.httpexceptions import HTTPNotFound

    def item(request: Any) -> str:
        if request.matchdict["item_id"] == "404":
            raise HTTPNotFound()
        return str(request.matchdict["item_id"])

    def health(request: Any) -> str:
        return "ok"

    with Configurator() as config:
        config.include("sfmon.adapters.pyramid")
        config.add_route("item", "/api/items/{item_id}")
        config.add_route("health", "api/health")  # no leading slash: Pyramid allows it
        config.add_view(item, route_name="item", renderer="string")
        config.add_view(health, route_name="health", renderer="string")
        return config.make_wsgi_app()


@_webob_cgi
def test_pyramid_templates_hundred_ids_and_unmatched() -> None:
    app = _pyramid_app()

    seen = drive(app, "/api/health", *ITEM_URLS, "/api/items/404", "/nope/1")

    assert seen[0] == (200, "/api/health")
    assert set(seen[1:101]) == {(200, "/api/items/{item_id}")}
    assert seen[101:] == [(404, "/api/items/{item_id}"), (404, UNSET)]


# -- Bottle --------------------------------------------------------------------------


def _bottle_app() -> Any:
    import bottle

    from sfmon.adapters.bottle import RoutePlugin

    app = bottle.Bottle()
    app.install(RoutePlugin())

    @app.get("/api/items/<item_id:int>")
    def item(item_id: int) -> str:
        return str(item_id)

    @app.get("/api/health")
    def health() -> str:
        return "ok"

    child = bottle.Bottle()
    child.install(RoutePlugin())

    @child.get("/things/<name>")
    def thing(name: str) -> str:
        return name

    app.mount("/shop/", child)
    return app


def test_bottle_templates_hundred_ids_and_unmatched() -> None:
    app = _bottle_app()

    seen = drive(app, "/api/health", *ITEM_URLS, "/shop/things/hat", "/nope/1", "/api/items/x")
    seen += drive(app, "/api/health", method="POST")

    assert seen[0] == (200, "/api/health")
    assert set(seen[1:101]) == {(200, "/api/items/<item_id:int>")}
    assert seen[101:] == [
        (200, "/shop/things/<name>"),
        (404, UNSET),
        (404, UNSET),
        (405, UNSET),
    ]


def test_bottle_route_set_before_callback_runs() -> None:
    """Set first, so a callback that raises (a 500) still has its route."""
    import bottle

    from sfmon.adapters.bottle import RoutePlugin

    def view() -> str:
        raise RuntimeError("boom")

    environ: dict[str, Any] = {}
    bottle.request.bind(environ)
    wrapped = RoutePlugin().apply(view, types.SimpleNamespace(rule="/api/items/<id:int>"))

    with pytest.raises(RuntimeError):
        wrapped()

    assert environ[ROUTE_KEY] == "/api/items/<id:int>"


def test_bottle_plugin_keeps_callback_metadata() -> None:
    from sfmon.adapters.bottle import RoutePlugin

    def view() -> str:
        """Docs."""
        return "ok"

    wrapped = RoutePlugin().apply(view, types.SimpleNamespace(rule="/v"))

    assert wrapped.__name__ == "view"
    assert wrapped.__wrapped__ is view  # type: ignore[attr-defined]
    assert RoutePlugin.api == 2
