"""JSON logs under real gunicorn: one access line per request, ids linked, hostile input."""

from __future__ import annotations

import json
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import ROOT
from test_gunicorn_core import Server

pytestmark = pytest.mark.integration
DEMO = str(ROOT / "examples" / "softfactory")
AUTH = {"Authorization": "Bearer demo_token"}
ID_PATTERN_LEN = 32


def demo(tmp_path: Path, *args: str) -> Server:
    srv = Server(
        tmp_path,
        *args,
        "--chdir",
        DEMO,
        app="app:app",
        env={"SOFTFACTORY_DB": str(tmp_path / "demo.sqlite3")},
    )
    return srv


def lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    raw = path.read_bytes().splitlines()
    return [json.loads(line) for line in raw]  # every line must parse


def get_id(url: str, headers: dict[str, str]) -> str:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()
        ids = resp.headers.get_all("X-Request-Id")
    assert ids is not None and len(ids) == 1
    return ids[0]


def test_one_access_line_per_request_with_linked_ids(tmp_path: Path) -> None:
    srv = demo(tmp_path, "-w", "4")
    n = 5000
    try:
        srv.wait_workers(4)
        url = srv.base + "/api/coocook/chefs"
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: get_id(url, AUTH), range(n)))
    finally:
        srv.stop()
    logs = tmp_path / "logs"

    access = lines(logs / "access.log")
    app_lines = [r for r in lines(logs / "app.log") if r["message"] == "listing chefs"]

    assert len(access) == n
    assert len(set(ids)) == n
    assert {r["request_id"] for r in access} == set(ids)
    assert {(r["route"], r["status"], r["message"]) for r in access} == {
        ("/api/coocook/chefs", 200, "Request completed: 200")
    }
    assert all(r["timestamp"].endswith("Z") and r["latency_ms"] > 0 for r in access)
    assert sorted(r["request_id"] for r in app_lines) == sorted(ids)
    gunicorn_access = [ln for ln in srv.proc.output().splitlines() if '"GET /api' in ln]
    assert gunicorn_access == []  # no duplicate access lines from gunicorn


def test_gthread_worker_gives_a_fresh_id_after_a_request_with_one(tmp_path: Path) -> None:
    srv = demo(tmp_path, "-w", "1", "--worker-class", "gthread", "--threads", "2")
    try:
        url = srv.base + "/api/coocook/chefs"
        first = get_id(url, {**AUTH, "X-Request-Id": "client-abc-1"})
        second = [get_id(url, AUTH) for _ in range(5)]
    finally:
        srv.stop()
    app_lines = [
        r for r in lines(tmp_path / "logs" / "app.log") if r["message"] == "listing chefs"
    ]

    assert first == "client-abc-1"
    assert "client-abc-1" not in second and len(set(second)) == 5
    assert [r["request_id"] for r in app_lines] == ["client-abc-1", *second]


HOSTILE = [
    pytest.param(b"/api/coocook/chefs", {b"X-Request-Id": b"x" * 5000}, True, id="5000-char-id"),
    pytest.param(
        b"/api/coocook/chefs",
        {b"X-Request-Id": b"{urn:uuid:0d0c1a4e-8d3f-4b55-9c3a-2b1e5e3f9a77}"},
        True,
        id="urn-uuid-id",
    ),
    # raw non-ASCII bytes in the request line are refused by gunicorn itself (400, before
    # the app); percent-encoded ones reach it as latin-1 text, as WSGI passes them
    pytest.param(
        b"/api/caf%C3%A9/%FF%FE",
        {b"X-Request-Id": b"caf\xc3\xa9", b"X-Note": b"\xff"},
        True,
        id="non-ascii-path-and-header",
    ),
    pytest.param(b"/api/back\\slash", {b"X-Request-Id": b"a\\b"}, True, id="backslash"),
    pytest.param(b"/api/tab%09here", {b"X-Request-Id": b"a\tb"}, True, id="tab"),
    pytest.param(b'/api/new%0Aline%0D%0A{"level":"ERROR"}', {}, False, id="encoded-newline"),
]


def raw_get(port: int, path: bytes, headers: dict[bytes, bytes]) -> bytes:
    head = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += b"Authorization: Bearer demo_token\r\n"
    for k, v in headers.items():
        head += k + b": " + v + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize(("path", "headers", "fresh_id"), HOSTILE)
def test_hostile_request_gives_one_valid_line(
    tmp_path: Path, path: bytes, headers: dict[bytes, bytes], fresh_id: bool
) -> None:
    srv = demo(tmp_path, "-w", "1")
    try:
        response = raw_get(srv.port, path, headers)
    finally:
        srv.stop()
    access = lines(tmp_path / "logs" / "access.log")

    assert response.startswith(b"HTTP/1.1 ")
    assert len(access) == 1
    rid = access[0]["request_id"]
    assert len(rid) == ID_PATTERN_LEN and int(rid, 16) >= 0
    header_ids = [ln for ln in response.split(b"\r\n") if ln.lower().startswith(b"x-request-id:")]
    assert header_ids == [b"X-Request-Id: " + rid.encode()]
    raw_log = (tmp_path / "logs" / "access.log").read_bytes()
    assert raw_log.count(b"\n") == 1 and b"x" * 200 not in raw_log
    if fresh_id:
        for value in headers.values():
            assert value not in raw_log or len(value) < 4
