"""One test per claim of ``docs/security.md``.

In-process tests call ``sfmon.Monitor`` directly; the integration tests run the demo or
the plain test app under real gunicorn and read what it wrote to disk.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, http_get
from test_gunicorn_core import Server, get, scrape, total

import sfmon
from sfmon import protect, routes, store
from sfmon.merge import StoreReader
from sfmon.record import RequestRecord

_ns = itertools.count()
TOKEN = "s3cret-metrics-token"


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[str]:
    d = str(tmp_path / "store")
    os.makedirs(d)
    store.reset_for_tests(d)
    yield d
    store.reset_for_tests(None)


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def monitor(app: Any = ok_app, **options: Any) -> sfmon.Monitor:
    options.setdefault("namespace", f"sec{next(_ns)}")
    options.setdefault("access_log", False)
    return sfmon.Monitor(app, **options)


def call(
    app: Any, path: str, method: str = "GET", **environ: Any
) -> tuple[int, dict[str, str], bytes]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SERVER_NAME": "x",
        "REMOTE_ADDR": "127.0.0.1",
        **environ,
    }
    got: list[Any] = []
    body = app(env, lambda status, headers, exc_info=None: got.append((status, headers)))
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    status, headers = got[-1]
    return int(status[:3]), dict(headers), data


# -- 1. the data endpoints' protection ------------------------------------------------------

DATA = ("/api/metrics/prometheus", "/api/metrics/summary", "/api/metrics/errors")
PROBES = ("/api/metrics/health", "/api/metrics/ready", "/api/metrics/live")


def test_token_guards_the_data_endpoints_and_never_the_probes(store_dir: str) -> None:
    m = monitor(metrics_token=TOKEN)
    call(m, "/x")

    for path in DATA:
        for auth in (None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"bearer {TOKEN}", f"Basic {TOKEN}"):
            extra = {} if auth is None else {"HTTP_AUTHORIZATION": auth}
            status, headers, body = call(m, path, **extra)
            assert status == 401, (path, auth)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert b"softfactory" not in body and b"requests" not in body
            head = call(m, path, "HEAD", **extra)
            assert head[0] == 401 and head[2] == b""  # HEAD: no body, refused or not
        assert call(m, path, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")[0] == 200
    for path in PROBES:
        assert call(m, path)[0] in (200, 503)


def test_token_is_compared_in_constant_time(
    store_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(protect.hmac, "compare_digest", spy)
    m = monitor(metrics_token=TOKEN)

    call(m, DATA[0], HTTP_AUTHORIZATION="Bearer wrong")
    call(m, DATA[0], HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    assert seen == [(b"Bearer wrong", f"Bearer {TOKEN}".encode())] + [
        (f"Bearer {TOKEN}".encode(),) * 2
    ]


def test_allow_list_and_trusted_proxies(store_dir: str) -> None:
    m = monitor(metrics_allow=("192.0.2.0/24",), trusted_proxies=("10.0.0.1",))
    url = DATA[0]

    assert call(m, url, REMOTE_ADDR="192.0.2.7")[0] == 200
    assert call(m, url, REMOTE_ADDR="198.51.100.1")[0] == 403
    # X-Forwarded-For from an untrusted peer is ignored: no spoofing the allow-list.
    assert call(m, url, REMOTE_ADDR="198.51.100.1", HTTP_X_FORWARDED_FOR="192.0.2.7")[0] == 403
    # Via the trusted proxy, the client is the right-most hop the proxy appended;
    # whatever the client put before it does not count.
    via = {"REMOTE_ADDR": "10.0.0.1"}
    assert call(m, url, **via, HTTP_X_FORWARDED_FOR="192.0.2.7")[0] == 200
    assert call(m, url, **via, HTTP_X_FORWARDED_FOR="192.0.2.7, 198.51.100.1")[0] == 403
    assert call(m, url, **via, HTTP_X_FORWARDED_FOR="garbage, 192.0.2.7")[0] == 200
    assert call(m, url, **via, HTTP_X_FORWARDED_FOR="not-an-ip")[0] == 403
    assert call(m, url, REMOTE_ADDR="10.0.0.1")[0] == 403  # the proxy itself is not allowed
    assert call(m, PROBES[2], REMOTE_ADDR="198.51.100.1")[0] == 200


def test_token_is_not_in_the_config_hash_or_the_exposition(store_dir: str) -> None:
    a = monitor(metrics_token=TOKEN, namespace="sec_hash")
    b = monitor(metrics_token="another-token-123", namespace="sec_hash")
    assert a.settings.config_hash() == b.settings.config_hash()
    body = call(a, DATA[0], HTTP_AUTHORIZATION=f"Bearer {TOKEN}")[2]
    assert TOKEN.encode() not in body


def test_protection_under_gunicorn_from_the_environment(tmp_path: Path) -> None:
    srv = Server(tmp_path, "-w", "1", env={"SFMON_METRICS_TOKEN": TOKEN})
    try:
        refused = [http_get(srv.base + p)[0] for p in DATA]
        allowed = [http_get(srv.base + p, {"Authorization": f"Bearer {TOKEN}"})[0] for p in DATA]
        probes = [http_get(srv.base + p)[0] for p in PROBES]
    finally:
        srv.stop()
    assert refused == [401, 401, 401] and allowed == [200, 200, 200]
    assert probes == [200, 200, 200]


# -- 2. no secrets in logs; 3. no log injection ---------------------------------------------


def test_the_record_sinks_get_has_no_headers_query_or_body() -> None:
    import types

    from sfmon.record import FIELDS, PyRequestRecord

    fields = set(FIELDS)
    assert set(PyRequestRecord.__slots__) == fields
    # With the C speedups the fields live in C: the same names, nothing else to fill.
    held = {
        name
        for klass in RequestRecord.__mro__
        for name, value in vars(klass).items()
        if isinstance(value, types.MemberDescriptorType)
    }
    assert held == fields
    record = RequestRecord(*[None] * len(FIELDS))
    assert not hasattr(record, "__dict__")
    assert fields == {
        "client_addr",
        "content_length",
        "exc_info",
        "exception",
        "latency_ms",
        "method",
        "method_label",
        "path",
        "request_id",
        "route",
        "started_at",
        "status",
        "trace_id",
        "ttfb_ms",
        "user_id",
    }


@pytest.fixture
def access_log(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    from sfmon.access_log import AccessLogSink
    from sfmon.logs import JsonFormatter, JsonStreamHandler

    path = tmp_path / "access.log"
    stream = open(path, "w", encoding="utf-8")  # noqa: SIM115
    logger = logging.getLogger(f"sfmon.security.{next(_ns)}")
    logger.propagate = False
    handler = JsonStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield AccessLogSink(logger, error_logger=logger), path
    logger.removeHandler(handler)
    handler.close()
    stream.close()


INJECTIONS = [
    "/a\nb",
    "/a\r\nX-Forged: 1",
    '/x","level":"CRITICAL","message":"forged',
    '/x"}\n{"level":"CRITICAL","message":"forged"}',
    "/\x00\x1b[31mred\u2028\u2029",
    "/\ud800lone",
    "/" + "%0A" * 50,
]


def test_access_lines_hold_no_secret_and_cannot_be_forged(
    store_dir: str, access_log: tuple[Any, Path]
) -> None:
    sink, path = access_log
    secret = "tok-0123456789abcdef"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"].endswith("boom"):
            raise RuntimeError("failed")  # the traceback is logged too
        start_response("200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", secret)])
        return [b"body " + secret.encode()]

    m = monitor(app, sinks=[sink])
    secrets_env = {
        "HTTP_AUTHORIZATION": f"Bearer {secret}",
        "HTTP_COOKIE": f"session={secret}",
        "HTTP_X_API_KEY": secret,
        "QUERY_STRING": f"api_key={secret}&token={secret}",
    }
    for p in [*INJECTIONS, "/boom"]:
        try:
            call(m, p, **secrets_env)
        except RuntimeError:
            pass

    raw = path.read_bytes()
    lines = raw.decode("utf-8").splitlines()
    access = [json.loads(ln) for ln in lines if '"message":"Request completed' in ln]
    assert secret not in raw.decode("utf-8")
    assert len(access) == len(INJECTIONS) + 1  # one line per request, never more
    assert all(set(ln) >= {"timestamp", "level", "request_id", "path", "status"} for ln in access)
    assert not any(ln.get("level") == "CRITICAL" or "X-Forged" in ln for ln in access)
    assert [ln["path"] for ln in access[:2]] == ["/a\nb", "/a\r\nX-Forged: 1"]  # kept as data


def test_demo_under_gunicorn_logs_no_secret_and_one_line_per_request(tmp_path: Path) -> None:
    """Authorization, cookies, API keys and query strings never reach any log file."""
    secret = "leak-canary-7f3a9c"
    srv = Server(
        tmp_path,
        "-w",
        "2",
        "--chdir",
        str(ROOT / "examples" / "softfactory"),
        app="app:app",
        env={"SOFTFACTORY_DB": str(tmp_path / "db.sqlite3")},
    )
    sent = 0
    try:
        headers = {
            "Authorization": "Bearer demo_token",
            "Cookie": f"session={secret}",
            "X-Api-Key": secret,
        }
        q = urllib.parse.quote
        for path in (
            f"/api/coocook/chefs?token={secret}",
            f"/api/error?api_key={secret}",  # a 500 with a logged traceback
            "/api/" + q('x"}\n{"level":"CRITICAL"}'),
            "/api/" + q("a\r\nb"),
        ):
            http_get(srv.base + path, headers)
            sent += 1
        http_get(srv.base + "/api/coocook/chefs", {"Authorization": f"Bearer {secret}"})  # 401
        http_get(srv.base + "/api/coocook/chefs", {"X-Request-Id": f'"}}{{"x":"{secret}'})
        sent += 2
    finally:
        srv.stop()

    logs = tmp_path / "logs"
    texts = {p.name: p.read_text("utf-8") for p in logs.iterdir()} | {
        "gunicorn.log": (tmp_path / "gunicorn.log").read_text("utf-8", "replace")
    }
    for name, text in texts.items():
        assert secret not in text, name
        assert "demo_token" not in text, name
    access = [json.loads(ln) for ln in texts["access.log"].splitlines()]
    assert len(access) == sent
    assert "Invalid or expired token" in texts["app.log"]
    assert "RuntimeError: demo failure" in texts["errors.log"]  # tracebacks, no secrets
    for text in (texts["app.log"], texts["errors.log"]):
        for line in text.splitlines():
            assert isinstance(json.loads(line), dict)


def test_errors_report_holds_labels_not_raw_paths_or_queries(store_dir: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise KeyError("x")

    m = monitor(app)
    with pytest.raises(KeyError):
        call(m, "/users/12345/reset/0123456789abcdef0123", QUERY_STRING="token=qs-secret-1")
    status, _, body = call(m, "/api/metrics/errors")

    recent = json.loads(body)["recent"]
    assert status == 200 and recent[0]["route"] == "/users/<int>/reset/<hex>"
    assert b"qs-secret-1" not in body and b"12345" not in body


def test_sfmon_never_reads_the_request_body(store_dir: str) -> None:
    class Untouchable:
        def read(self, *a: Any) -> bytes:
            raise AssertionError("sfmon read the body")

        readline = readlines = __iter__ = read

    for path in ("/x", "/api/metrics/health", "/api/metrics/prometheus"):
        assert call(monitor(), path, "POST", **{"wsgi.input": Untouchable()})[0] in (200, 405)


def test_refused_scrapes_cost_nothing(store_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused request never reaches the store: hammering the endpoint without the
    token cannot make sfmon merge files."""
    from sfmon.exposition import StoreCollector

    def boom(self: Any) -> Any:
        raise AssertionError("the store was read for a refused request")

    monkeypatch.setattr(StoreCollector, "collect", boom)
    m = monitor(metrics_token=TOKEN, metrics_allow=("127.0.0.0/8",))

    assert call(m, DATA[0])[0] == 401
    assert call(m, DATA[0], REMOTE_ADDR="192.0.2.1")[0] == 403
    assert call(m, DATA[1])[0] == 401 and call(m, DATA[2])[0] == 401


# -- 4. label-cardinality DoS is capped ------------------------------------------------------


def test_label_cardinality_is_capped(store_dir: str) -> None:
    n = 0

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        nonlocal n
        n += 1
        path = environ["PATH_INFO"]
        if path.startswith("/tpl"):
            environ["sfmon.route"] = f"/tpl/{n}"  # an app that puts ids into templates
        start_response("404 Not Found" if path.startswith("/scan") else "200 OK", [])
        return [b""]

    m = monitor(app, max_series=50)
    ns = m.settings.namespace
    for i in range(600):
        call(m, f"/scan/{i}/wp-login.php")  # a scanner: all 404
        call(m, f"/items/{i}/{i:08x}deadbeefcafebabe")  # ids in URLs: normalised
        call(m, f"/tpl/{i}")
        call(m, "/x", method=f"M{i}")  # invented methods

    snap = StoreReader(store_dir).snapshot()
    reqs = snap.families[f"{ns}_requests_total"].series
    print(f"\ncardinality: 2400 requests, {len(reqs)} series of requests_total")
    assert len(reqs) <= 50 + 1
    assert ("GET", routes.UNMATCHED, "404") in reqs
    assert ("GET", "/items/<int>/<hex>", "200") in reqs
    assert (store.OVERFLOW,) * 3 in reqs
    assert {k[0] for k in reqs} <= routes.STANDARD_METHODS | {routes.OTHER_METHOD, store.OVERFLOW}
    assert sum(reqs.values()) // store.VALUE_SCALE == 2400  # capped, never dropped
    overflow = snap.families["sfmon_label_overflow_total"].series
    assert overflow[(f"{ns}_requests_total",)] > 0
    body = call(m, DATA[0])[2]
    assert len(body) < 200_000


# -- 5. request-id injection ------------------------------------------------------------------


@pytest.mark.parametrize(
    "inbound",
    [
        'a"},{"level":"CRITICAL',
        "a\r\nSet-Cookie: x=1",
        "a" * 129,
        "-leading-dash",
        "../../etc/passwd",
        "<script>alert(1)</script>",
        "id with spaces",
        "caf\xc3\xa9",
    ],
)
def test_malformed_request_ids_are_replaced_never_echoed(
    store_dir: str, access_log: tuple[Any, Path], inbound: str
) -> None:
    sink, path = access_log
    m = monitor(sinks=[sink])
    before = rejected(store_dir)

    status, headers, _ = call(m, "/x", HTTP_X_REQUEST_ID=inbound)

    rid = headers["X-Request-Id"]
    assert status == 200 and rid != inbound and len(rid) == 32
    assert inbound not in path.read_text("utf-8")
    assert json.loads(path.read_text("utf-8").splitlines()[-1])["request_id"] == rid
    assert rejected(store_dir) == before + 1


def rejected(store_dir: str) -> int:
    fam = StoreReader(store_dir).snapshot().families.get("sfmon_request_ids_rejected_total")
    return 0 if fam is None else sum(fam.series.values()) // store.VALUE_SCALE


# -- 6. private permissions --------------------------------------------------------------------


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


def test_store_is_private_even_with_umask_0_and_a_world_writable_parent(tmp_path: Path) -> None:
    """A shared 0777 PROMETHEUS_MULTIPROC_DIR, umask 0: sfmon's directory is still 0700
    and every file in it 0600 (store, archive, lock, service facts, errors, slots)."""
    mp = tmp_path / "mp"
    mp.mkdir()
    mp.chmod(0o777)
    old = os.umask(0)
    try:
        srv = Server(tmp_path, "-w", "2", "--max-requests", "5")
    finally:
        os.umask(old)
    try:
        for _ in range(40):
            get(srv.base + "/ok")
            get(srv.base + "/boom")
        samples = scrape(srv.base)  # cpu sample, sweep
        files = modes(srv.mpdir / "sfmon")
        top = stat.S_IMODE((srv.mpdir / "sfmon").stat().st_mode)
    finally:
        srv.stop()

    assert total(samples, "softfactory_requests_total") == 80
    assert top == 0o700
    assert {"archive.sfm", "lock", "service.json", "recent-errors.jsonl", "slot-0"} <= set(files)
    assert any(n.startswith("w-") for n in files)
    loose = {n: oct(m) for n, m in files.items() if m != 0o600}
    assert loose == {}, loose


def test_private_directory_when_the_variable_is_unset() -> None:
    from sfmon.gunicorn_hooks import _PRIVATE_MARK, ENV, prepare_directory

    env: dict[str, str] = {}
    sfmon_dir = prepare_directory(env)
    try:
        assert stat.S_IMODE(os.stat(env[ENV]).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sfmon_dir).st_mode) == 0o700
        assert env[_PRIVATE_MARK] == env[ENV]
    finally:
        import shutil

        shutil.rmtree(env[ENV])
        store.configure_directory(None)
