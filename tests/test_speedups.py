"""The C speedups against the pure-Python reference: same inputs, same results.

``sfmon.Monitor`` runs the common case of a request in C (``sfmon/_speedups.c``) and
hands every other case to the Python functions in ``sfmon/middleware.py``;
``sfmon.middleware.PureMonitor`` runs everything in Python. Here both serve the same
generated requests, with a shared fake clock so latencies are equal, and must answer
the same, record the same store values (sums and native buckets included) and give the
sinks the same records.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfmon
from sfmon import middleware, native, store
from sfmon.merge import HistogramValue, StoreReader
from sfmon.record import FIELDS, PyRequestRecord, RequestRecord

ROOT = Path(__file__).resolve().parent.parent


def test_extension_is_built_and_used() -> None:
    # A silent fallback to pure Python would hide a broken build: the test suite needs
    # the C part (gcc and the Python headers, as any package with C code).
    from sfmon import _speedups  # type: ignore[attr-defined]

    assert issubclass(sfmon.Monitor, _speedups.MonitorBase)
    assert sfmon.Monitor is not middleware.PureMonitor


@pytest.mark.parametrize("schema", range(-4, 9))
def test_native_index_matches_python(schema: int, store_dir: str) -> None:
    m = sfmon.Monitor(
        lambda e, s: [], namespace=f"nx{schema + 4}", access_log=False, native_schema=schema
    )
    index = native.make_indexer(schema)
    rng = random.Random(schema)
    values = [2.0**e for e in range(-60, 60)] + [math.nextafter(2.0**e, 0) for e in range(-60, 60)]
    values += [rng.lognormvariate(0, 4) for _ in range(5000)] + [1e-300, 1.7e308, math.inf]
    values += [native.bucket_bounds(i, schema)[1] for i in range(-40, 40)]
    for v in values:
        assert m._native_index(v) == index(v), v


class Clock:
    """A clock only the app moves: equal latencies in both implementations."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


STATUS = ["200 OK", "201 Created", "204 No Content", "302 Found", "404 Not Found"]
STATUS += ["500 Internal Server Error", "999 Odd", " 20", "abc", None]
HEADERS: list[Any] = [
    [("Content-Type", "text/plain")],
    [],
    [("X-Request-Id", "from-app")],
    [("x-request-ID", "a"), ("Set-Cookie", "b")],
    [("Content-Type",)],
    [["Content-Type", "text/plain"]],
    (("Content-Type", "text/plain"),),
    [("X-REQUEST-İD", "x")],
]
BODIES = ["list", "empty", "gen", "gen_raise", "raise_before", "raise_after", "write"]
BODIES += ["tuple", "odd_items", "close_raises", "gen_empty_chunks"]
_TP = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
TRACEPARENTS = [
    None,
    None,
    _TP,
    f" {_TP} ",
    _TP.upper(),
    "ff" + _TP[2:],
    "",
    "00-" + "0" * 32 + _TP[35:],
]
TRACEPARENTS += [_TP[:36] + "0" * 16 + "-01", _TP[:-1], _TP + "0", "00_" + _TP[3:], "tp"]
LATENCIES = [0.0, 1e-9, 0.5, 1.0, 2.0, 2.5, 4.0, 99.9, 250.0, 1e4, 3e5]

request_spec = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "HEAD", "BREW", "", 7]),
        "path": st.sampled_from(["/items/7", "/api/users/12/orders", "/x%20y", "/ü", ""]),
        "route": st.sampled_from([None, "/items/<id>", "", "r" * 250, 5, "/a"]),
        "status": st.sampled_from(STATUS),
        "headers": st.sampled_from(range(len(HEADERS))),
        "body": st.sampled_from(BODIES),
        "consume": st.sampled_from([None, None, 0, 1]),
        "inbound": st.sampled_from([None, None, "abc-123", "bad id!", "", "x" * 129, "ok.9:_-"]),
        "traceparent": st.sampled_from(TRACEPARENTS),
        "multithread": st.sampled_from([False, False, True]),
        "latency": st.one_of(st.sampled_from(LATENCIES), st.floats(0, 1e6)),
        "ttfb": st.sampled_from([0.0, 0.25, 3.0]),
        "user": st.sampled_from([None, "u1", 42]),
    }
)


def make_app(clock: Clock) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        spec = environ["test.spec"]
        if spec["route"] is not None:
            environ["sfmon.route"] = spec["route"]
        if spec["user"] is not None:
            environ["sfmon.user_id"] = spec["user"]
        kind = spec["body"]
        clock.t += spec["ttfb"] / 1000.0
        if kind == "raise_before":
            clock.t += spec["latency"] / 1000.0
            raise KeyError("before")
        headers = HEADERS[spec["headers"]]
        if spec["status"] is not None:
            write = start_response(spec["status"], list(headers) if kind != "tuple" else headers)
        if kind == "raise_after":
            clock.t += spec["latency"] / 1000.0
            raise ValueError("after")
        if kind == "write":
            write(b"written")
            clock.t += spec["latency"] / 1000.0
            return [b"rest"]
        clock.t += spec["latency"] / 1000.0
        if kind == "list":
            return [b"hello", b" world"]
        if kind == "empty":
            return []
        if kind == "tuple":
            return (b"t", b"u")
        if kind == "odd_items":
            return [b"a", 5]

        def gen() -> Any:
            yield b""
            yield b"chunk1"
            if kind == "gen_raise":
                raise RuntimeError("midway")
            if kind != "gen_empty_chunks":
                yield b"chunk2"

        if kind == "close_raises":

            class Body:
                def __iter__(self) -> Any:
                    return iter([b"x"])

                def close(self) -> None:
                    raise OSError("close failed")

            return Body()
        return gen()

    return app


def serve(app: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Drive *app* like a sync server; return what a client and the server saw."""
    environ: dict[str, Any] = {"PATH_INFO": spec["path"], "REQUEST_METHOD": spec["method"]}
    setup_testing_defaults(environ)
    environ["wsgi.multithread"] = spec["multithread"]
    environ["test.spec"] = spec
    if spec["inbound"] is not None:
        environ["HTTP_X_REQUEST_ID"] = spec["inbound"]
    if spec["traceparent"] is not None:
        environ["HTTP_TRACEPARENT"] = spec["traceparent"]
    out: dict[str, Any] = {"written": []}

    def start_response(status: Any, headers: Any, exc_info: Any = None) -> Any:
        out["status"] = status
        out["headers"] = headers
        return out["written"].append

    try:
        body = app(environ, start_response)
    except Exception as exc:
        out["raised"] = (type(exc), str(exc))
        return normalise(out)
    chunks = []
    try:
        for chunk in body:
            chunks.append(chunk)
            if spec["consume"] is not None and len(chunks) > spec["consume"]:
                break
    except Exception as exc:
        out["raised"] = (type(exc), str(exc))
    try:
        body.close()
    except Exception as exc:
        out["close_raised"] = (type(exc), str(exc))
    out["chunks"] = chunks
    return normalise(out)


def normalise(out: dict[str, Any]) -> dict[str, Any]:
    headers = out.get("headers")
    if isinstance(headers, list):
        out["headers"] = [
            (h[0], "<id>") if h and h[0] == "X-Request-Id" and len(h) == 2 else h for h in headers
        ]
    return out


def record_fields(r: RequestRecord) -> dict[str, Any]:
    fields = {k: getattr(r, k) for k in FIELDS}
    fields.pop("started_at")  # wall clock
    fields.pop("request_id")  # minted: checked apart
    info = fields.pop("exc_info")
    fields["exc_type"] = None if info is None else info[0]
    return fields


def store_values(directory: str, ns: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fam in StoreReader(directory).snapshot().families.items():
        if not name.startswith(ns + "_"):
            continue
        for labels, v in fam.series.items():
            if isinstance(v, HistogramValue):
                v = {k: getattr(v, k) for k in HistogramValue.__slots__}
            out[(name[len(ns) :], labels)] = v
    return out


_n = itertools.count()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=st.lists(request_spec, min_size=1, max_size=12))
def test_c_and_python_agree(requests: list[dict[str, Any]], tmp_path: Path) -> None:
    from sfmon import _speedups  # type: ignore[attr-defined]

    directory = str(tmp_path / f"s{next(_n)}")
    os.makedirs(directory)
    store.reset_for_tests(directory)
    clock = Clock()
    saved = middleware._perf
    middleware._perf = clock  # type: ignore[assignment]
    _speedups.set_clock(clock)
    try:
        n = next(_n)
        got: dict[str, list[RequestRecord]] = {"c": [], "p": []}
        opts: dict[str, Any] = {"access_log": False, "native_schema": 2}
        c_app = sfmon.Monitor(make_app(clock), namespace=f"c{n}", sinks=[got["c"].append], **opts)
        p_app = middleware.PureMonitor(
            make_app(clock), namespace=f"p{n}", sinks=[got["p"].append], **opts
        )
        # The first request of a process sets up its store file: always Python.
        for app in (c_app, p_app):
            clock.t = 0.0
            serve(app, {**requests[0], "body": "list", "status": "200 OK", "headers": 0})
        before = _speedups.stats()
        for spec in requests:
            clock.t = 0.0
            c_out = serve(c_app, spec)
            clock.t = 0.0
            assert c_out == serve(p_app, spec), spec
        after = _speedups.stats()
    finally:
        middleware._perf = saved  # type: ignore[assignment]
        _speedups.set_clock(None)
    assert [record_fields(r) for r in got["c"]] == [record_fields(r) for r in got["p"]]
    for r, spec in zip(got["c"][1:], requests):
        if (
            spec["inbound"] is not None
            and middleware.resolve_request_id(spec["inbound"])[0] == spec["inbound"]
        ):
            assert r.request_id == spec["inbound"]
    c_values = store_values(directory, f"c{n}")
    assert c_values == store_values(directory, f"p{n}")
    assert c_values  # something was recorded
    fast = [
        s
        for s in requests
        if not s["multithread"]
        and (s["traceparent"] is None or s["traceparent"].strip() == s["traceparent"])
        and (s["body"] in ("list", "empty") or (s["body"] == "tuple" and s["consume"] is None))
        and s["status"] in STATUS[:5]
        and isinstance(s["route"], str)
        and 0 < len(s["route"]) <= 200
        and s["method"] != 7
        and s["inbound"] in (None, "abc-123", "ok.9:_-")
    ]
    # The C path really served the common requests (at most one per example may be
    # handed to Python for the once-a-second store check).
    assert after["finishes"] - before["finishes"] >= len(fast) - 1


def test_pure_python_path_passes_the_middleware_tests() -> None:
    # The reference implementation keeps its own test run: SFMON_SPEEDUPS=0.
    env = {**os.environ, "SFMON_SPEEDUPS": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            "tests/test_middleware.py",
            "tests/test_logs.py",
            "-k",
            "not slow",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_record_keeps_the_python_interface() -> None:
    args = ["id", None, "GET", "GET", "/p", "/r", 200, 5, 1.5, None, 1e9, None, "::1", None, None]
    c = RequestRecord(*args)
    p = PyRequestRecord(*args)
    assert repr(c) == repr(p) == "RequestRecord(GET /r 200 1.500ms id=id)"
    assert {k: getattr(c, k) for k in FIELDS} == {k: getattr(p, k) for k in FIELDS}
    kw = RequestRecord(**dict(zip(FIELDS, args)))
    assert kw.route == "/r" and kw.client_addr == "::1"
    with pytest.raises(TypeError):
        RequestRecord(*args[:-1])


def test_pure_mode_is_pure() -> None:
    code = "import sfmon, sfmon.middleware as m; print(sfmon.Monitor is m.PureMonitor)"
    env = {**os.environ, "SFMON_SPEEDUPS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_request_ids_unique_across_both_paths_and_fork(store_dir: str) -> None:
    from sfmon.request_id import new_request_id

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["sfmon.route"] = "/r"
        start_response("200 OK", [])
        return [environ["sfmon.request_id"].encode()]

    m = sfmon.Monitor(app, namespace="ids", access_log=False)
    ids = [new_request_id() for _ in range(50)]
    for i in range(200):
        env: dict[str, Any] = {"PATH_INFO": "/r", "REQUEST_METHOD": "GET"}
        setup_testing_defaults(env)
        env["wsgi.multithread"] = i % 2 == 0  # both paths
        body = m(env, lambda s, h, e=None: None)
        ids.extend(body)
        body.close()
        ids.append(new_request_id())
    ids = [i if isinstance(i, str) else i.decode() for i in ids]
    assert len(set(ids)) == len(ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    os.close(r)
    os.close(w)
    assert child[:16] != ids[-1][:16]  # a new random half in the child
