"""Monitor in-process: request ids, timing, errors, aborts, labels, options."""

from __future__ import annotations

import itertools
import random
import string
import time
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from support import BufferedClient as Client

import sfmon
from sfmon import store
from sfmon.merge import HistogramValue, StoreReader
from sfmon.request_id import current_request_id, get_request_id

_ns = itertools.count()


def monitor(app: Any, **options: Any) -> sfmon.Monitor:
    """A Monitor with its own namespace (families are process-global)."""
    options.setdefault("namespace", f"t{next(_ns)}")
    options.setdefault("access_log", False)
    return sfmon.Monitor(app, **options)


def series(directory: str, name: str) -> dict[tuple[str, ...], Any]:
    fam = StoreReader(directory).snapshot().families.get(name)
    if fam is None:
        return {}
    out: dict[tuple[str, ...], Any] = {}
    for labels, v in fam.series.items():
        if isinstance(v, HistogramValue):
            out[labels] = v
        elif isinstance(v, tuple):
            out[labels] = v[0]
        else:
            out[labels] = v / store.VALUE_SCALE
    return out


def hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_generates_one_request_id_and_exposes_it_to_the_app(store_dir: str) -> None:
    seen: list[object] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append((environ["sfmon.request_id"], get_request_id()))
        return hello(environ, start_response)

    resp = Client(monitor(app)).get("/x")

    ids = resp.headers.getlist("X-Request-Id")
    assert len(ids) == 1 and len(ids[0]) == 32 and int(ids[0], 16) >= 0
    assert seen == [(ids[0], ids[0])]
    assert get_request_id() is None


@pytest.mark.parametrize(
    ("inbound", "kept"),
    [
        pytest.param("abc-123_x.y:z", True, id="plain"),
        pytest.param("a" * 128, True, id="max-length"),
        pytest.param("a" * 129, False, id="too-long"),
        pytest.param("x" * 5000, False, id="5000-chars"),
        pytest.param("{urn:uuid:0d0c1a4e-8d3f-4b55-9c3a-2b1e5e3f9a77}", False, id="braces"),
        pytest.param("-leading-dash", False, id="leading-dash"),
        pytest.param("has space", False, id="space"),
        pytest.param("tab\there", False, id="tab"),
        pytest.param("back\\slash", False, id="backslash"),
        pytest.param("caf\u00e9", False, id="non-ascii"),
    ],
)
def test_inbound_request_id_kept_only_when_well_formed(
    store_dir: str, inbound: str, kept: bool
) -> None:
    m = monitor(hello)
    env = {"HTTP_X_REQUEST_ID": inbound}

    resp = Client(m).get("/", environ_overrides=env)

    ids = resp.headers.getlist("X-Request-Id")
    assert len(ids) == 1
    assert (ids[0] == inbound) is kept
    rejected = series(store_dir, "sfmon_request_ids_rejected_total").get((), 0)
    assert (rejected >= 1) is not kept


def test_app_set_request_id_is_replaced_not_duplicated(store_dir: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("x-request-id", "app-own"), ("Content-Type", "text/plain")])
        return [b"x"]

    resp = Client(monitor(app)).get("/", headers={"X-Request-Id": "client-1"})

    assert resp.headers.getlist("X-Request-Id") == ["client-1"]


def test_request_id_on_error_responses_too(store_dir: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("503 Service Unavailable", [])
        return [b""]

    resp = Client(monitor(app)).get("/")

    assert resp.status_code == 503
    assert len(resp.headers.getlist("X-Request-Id")) == 1


def test_exception_is_recorded_as_500_and_reraised_unchanged(store_dir: str) -> None:
    boom = KeyError("boom")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["sfmon.route"] = "/boom"
        raise boom

    m = monitor(app)
    with pytest.raises(KeyError) as info:
        Client(m).get("/boom")

    assert info.value is boom
    ns = m.settings.namespace
    assert series(store_dir, f"{ns}_requests_total") == {("GET", "/boom", "500"): 1}
    assert series(store_dir, f"{ns}_errors_total") == {("GET", "/boom", "500"): 1}
    assert series(store_dir, f"{ns}_exceptions_total") == {("KeyError",): 1}
    assert current_request_id.get() is None


def test_exception_while_streaming_is_recorded_as_500(store_dir: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["sfmon.route"] = "/gen"
        start_response("200 OK", [])
        yield b"first"
        raise ValueError("midway")

    m = monitor(app)
    with pytest.raises(ValueError, match="midway"):
        Client(m).get("/gen")

    ns = m.settings.namespace
    assert series(store_dir, f"{ns}_requests_total") == {("GET", "/gen", "500"): 1}
    assert series(store_dir, f"{ns}_exceptions_total") == {("ValueError",): 1}


def run_raw(
    app: Any, path: str = "/", method: str = "GET", consume: int | None = None
) -> tuple[str, list[tuple[str, str]], list[bytes]]:
    """Call a WSGI app like a server that may stop reading early, then close it."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": method}
    setup_testing_defaults(environ)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"], got["headers"] = status, headers
        return lambda data: None

    body = app(environ, start_response)
    chunks: list[bytes] = []
    try:
        for chunk in body:
            chunks.append(chunk)
            if consume is not None and len(chunks) >= consume:
                break
    finally:
        body.close()  # type: ignore[attr-defined]
    return got["status"], got["headers"], chunks


def test_clock_stops_at_close_so_streams_count_in_full(store_dir: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["sfmon.route"] = "/stream"
        start_response("200 OK", [])
        for _ in range(3):
            time.sleep(0.1)
            yield b"x" * 10

    m = monitor(app)
    run_raw(m)

    hv = series(store_dir, f"{m.settings.namespace}_request_latency_ms")[("GET", "/stream")]
    assert hv.count == 1 and hv.sum >= 300


def test_client_abort_midway_is_recorded_as_499(store_dir: str) -> None:
    closed: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["sfmon.route"] = "/long"
        start_response("200 OK", [])
        try:
            for _ in range(10):
                yield b"x"
        finally:
            closed.append(True)

    m = monitor(app)
    run_raw(m, consume=2)

    assert closed == [True]  # the app's generator was closed through us
    assert series(store_dir, f"{m.settings.namespace}_requests_total") == {
        ("GET", "/long", "499"): 1
    }


def test_in_progress_counts_live_requests(store_dir: str) -> None:
    seen: list[float] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(series(store_dir, f"{ns}_requests_in_progress")[()])
        return hello(environ, start_response)

    m = monitor(app)
    ns = m.settings.namespace
    Client(m).get("/")

    assert seen == [1.0]
    assert series(store_dir, f"{ns}_requests_in_progress")[()] == 0


def test_random_404s_and_invented_methods_add_at_most_two_series(store_dir: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("404 Not Found", [])
        return [b""]

    m = monitor(app)
    c = Client(m)
    rng = random.Random(7)
    for i in range(1000):
        path = "/" + "/".join(
            "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(1, 12)))
            for _ in range(rng.randint(1, 4))
        )
        method = "GET" if i % 2 else "".join(rng.choices(string.ascii_uppercase, k=6))
        c.open(path, method=method)

    got = series(store_dir, f"{m.settings.namespace}_requests_total")
    assert sorted(got) == [("GET", "<unmatched>", "404"), ("_OTHER", "<unmatched>", "404")]
    assert sum(got.values()) == 1000


def test_flask_route_templates_give_one_path_value(store_dir: str) -> None:
    flask = pytest.importorskip("flask")
    app = flask.Flask("t")

    @app.get("/api/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    app.wsgi_app = monitor(app.wsgi_app)  # type: ignore[method-assign]
    ns = app.wsgi_app.settings.namespace  # type: ignore[attr-defined]
    c = app.test_client()
    for i in range(100):
        assert c.get(f"/api/items/{i}", buffered=True).status_code == 200

    assert series(store_dir, f"{ns}_requests_total") == {
        ("GET", "/api/items/<int:item_id>", "200"): 100
    }


def test_builtin_endpoints_are_not_counted(store_dir: str) -> None:
    m = monitor(hello)
    c = Client(m)

    live = c.get("/api/metrics/live")
    prom = c.get("/api/metrics/prometheus")
    post = c.post("/api/metrics/live")

    assert live.status_code == 200 and live.json["alive"] is True  # type: ignore[index]
    assert prom.status_code == 200 and b"sfmon_store_files" in prom.data
    assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD"
    assert series(store_dir, f"{m.settings.namespace}_requests_total") == {}


def test_scrape_formats_and_gzip(store_dir: str) -> None:
    m = monitor(hello)
    c = Client(m)
    c.get("/x")

    text = c.get("/api/metrics/prometheus")
    om = c.get(
        "/api/metrics/prometheus",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    gz = c.get("/api/metrics/prometheus", headers={"Accept-Encoding": "gzip"})

    assert text.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.data.rstrip().endswith(b"# EOF")
    import gzip

    assert gz.headers["Content-Encoding"] == "gzip"
    assert b"_requests_total" in gzip.decompress(gz.data)


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        pytest.param({"bogus": 1}, TypeError, "bogus", id="unknown"),
        pytest.param({"max_series": 0}, ValueError, "max_series", id="max-series"),
        pytest.param({"max_series": "5"}, TypeError, "max_series", id="max-series-type"),
        pytest.param({"buckets": [5, 1]}, ValueError, "buckets", id="buckets-order"),
        pytest.param({"buckets": "1,2"}, TypeError, "buckets", id="buckets-str"),
        pytest.param({"native_schema": 9}, ValueError, "native_schema", id="schema"),
        pytest.param({"prefix": "api"}, ValueError, "prefix", id="prefix"),
        pytest.param({"namespace": "9x"}, ValueError, "namespace", id="namespace"),
        pytest.param({"request_id_header": "X Id"}, ValueError, "request_id_header", id="hdr"),
        pytest.param({"sinks": [1]}, TypeError, "sinks", id="sinks"),
        pytest.param({"metrics_allow": ["nope"]}, ValueError, "metrics_allow", id="allow"),
    ],
)
def test_bad_option_raises_naming_it(options: dict[str, Any], error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        sfmon.Monitor(hello, **options)


def test_bad_app_raises() -> None:
    with pytest.raises(TypeError, match="WSGI callable"):
        sfmon.Monitor("not an app")  # type: ignore[arg-type]


def test_options_come_from_environment(store_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFMON_PREFIX", "/ops")
    monkeypatch.setenv("SFMON_MAX_SERIES", "7")

    m = monitor(hello)

    assert m.settings.prefix == "/ops" and m.settings.max_series == 7
    assert Client(m).get("/ops/live").status_code == 200
    monkeypatch.setenv("SFMON_MAX_SERIES", "lots")
    with pytest.raises(ValueError, match="SFMON_MAX_SERIES"):
        monitor(hello)


def test_sink_failure_never_fails_the_request(store_dir: str, capfd: Any) -> None:
    records: list[sfmon.RequestRecord] = []

    def broken(record: sfmon.RequestRecord) -> None:
        raise RuntimeError("sink down")

    m = monitor(hello, sinks=[broken, records.append])
    resp = Client(m).get("/a/1")

    assert resp.status_code == 200
    assert [(r.status, r.path, r.route) for r in records] == [(200, "/a/1", "/a/<int>")]
    assert "sink down" in capfd.readouterr().err


def test_nested_monitor_counts_once(store_dir: str) -> None:
    inner = monitor(hello)
    outer = monitor(inner)

    Client(outer).get("/")

    assert series(store_dir, f"{outer.settings.namespace}_requests_total") != {}
    assert series(store_dir, f"{inner.settings.namespace}_requests_total") == {}


def test_settings_repr_hides_the_token() -> None:
    m = sfmon.Monitor(hello, namespace="reprtok", access_log=False, metrics_token="hunter2-secret")

    assert "hunter2-secret" not in repr(m.settings)
    assert m.settings.metrics_token == "hunter2-secret"
