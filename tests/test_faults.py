"""Faults under real gunicorn: the store deleted or read-only, hung checks, timeouts.

SIGKILLed workers are covered by
``test_gunicorn_core.py::test_sigkilled_worker_loses_only_its_inflight_requests``.
Each test checks that requests keep being served, what the counts are afterwards
(exact wherever the store survives), that the failure is visible (stderr, a
self-metric), and that gunicorn neither stops nor loops booting workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, http_get
from test_gunicorn_core import Server, get, scrape, total

import sfmon
from sfmon import store

integration = pytest.mark.integration


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def make(*args: str, sub: str = "a", **kw: Any) -> Server:
        srv = Server(tmp_path / sub, *args, **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def hammer(url: str, n: int, threads: int = 4) -> list[int]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: get(url), range(n)))


def access_lines(srv: Server, path: str) -> int:
    """Access lines for *path* in the server's logs/access.log (each must be JSON)."""
    log = srv.mpdir.parent / "logs" / "access.log"
    return sum(json.loads(ln)["path"] == path for ln in log.read_text().splitlines())


def boots(srv: Server) -> int:
    return srv.proc.output().count("Booting worker with pid")


def ok_count(srv: Server) -> float:
    return total(scrape(srv.base), "softfactory_requests_total", path="/ok")


# -- the multiprocess directory deleted -------------------------------------------------


def test_deleted_store_file_is_written_back_with_its_counts(tmp_path: Path) -> None:
    """In-process: the writer notices (within CHECK_INTERVAL) and restores its file;
    a scrape of the vanished directory recreates it instead of failing."""
    directory = tmp_path / "mp" / "sfmon"
    store.reset_for_tests(str(directory))
    try:
        app = sfmon.Monitor(ok_app, namespace="faults_rm", access_log=False)
        for _ in range(5):
            call(app, "/x")
        shutil.rmtree(tmp_path / "mp")
        from sfmon.merge import StoreReader

        empty = StoreReader(str(directory)).snapshot()  # must not raise
        writer = store.get_writer()
        writer.check_at = 0.0  # as if a second had passed
        for _ in range(3):
            call(app, "/x")
        fam = StoreReader(str(directory)).snapshot().families["faults_rm_requests_total"]
        recreated = (
            StoreReader(str(directory)).snapshot().families["sfmon_store_files_recreated_total"]
        )
    finally:
        store.reset_for_tests(None)

    assert empty.files_read == 0
    assert sum(fam.series.values()) // store.VALUE_SCALE == 8
    assert sum(recreated.series.values()) // store.VALUE_SCALE == 1
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(writer.path).st_mode) == 0o600


@integration
def test_deleted_directory_is_recreated_and_no_count_is_lost(servers: Any) -> None:
    """``rm -rf $PROMETHEUS_MULTIPROC_DIR`` (a tmp cleaner) under 2 busy workers."""
    srv: Server = servers("-w", "2")
    pids = srv.wait_workers(2)
    served = hammer(srv.base + "/ok", 100)
    assert ok_count(srv) == 100

    shutil.rmtree(srv.mpdir)
    scrape_after = http_get(srv.base + "/api/metrics/prometheus")[0]  # recreates the dir
    # Each worker notices within a second (one fstat per second) and writes its file
    # back from its mapping, counts included; keep both workers busy until both did.
    deadline = time.monotonic() + 20
    recreated = 0.0
    while recreated < 2 and time.monotonic() < deadline:
        served += hammer(srv.base + "/ok", 40)
        time.sleep(0.3)
        recreated = total(scrape(srv.base), "sfmon_store_files_recreated_total")
    served += hammer(srv.base + "/ok", 100)
    time.sleep(0.2)
    samples = scrape(srv.base)

    assert scrape_after == 200
    lines = access_lines(srv, "/ok")
    print(
        f"\nrm -rf store: served {len(served)}, counted "
        f"{total(samples, 'softfactory_requests_total', path='/ok'):.0f}, lines {lines}"
    )
    assert served.count(200) == len(served), "a request failed"
    assert lines == len(served)
    assert recreated == 2
    assert total(samples, "softfactory_requests_total", path="/ok") == len(served)
    assert total(samples, "softfactory_request_latency_ms_count", path="/ok") == len(served)
    assert total(samples, "softfactory_requests_in_progress") == 0
    assert set(srv.workers()) == pids and boots(srv) == 2  # no crash, no reboot
    assert "was deleted; recreated" in srv.proc.output()
    assert oct(os.stat(srv.mpdir / "sfmon").st_mode & 0o777) == "0o700"


# -- the multiprocess directory read-only -----------------------------------------------


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make *path* read-only for this user: chmod, or ``chattr +i`` for root."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o500)
        undo = [lambda: path.chmod(mode)]
    else:
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("root ignores chmod and chattr is not installed")
        done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
        undo = [lambda: subprocess.run([chattr, "-i", str(path)], check=True)]
    try:
        try:
            (path / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip(f"{path} stayed writable")
        yield
    finally:
        undo[0]()


@integration
def test_read_only_directory_never_stops_serving(servers: Any) -> None:
    srv: Server = servers("-w", "2")
    pids = srv.wait_workers(2)
    served = hammer(srv.base + "/ok", 60)
    store_dir = srv.mpdir / "sfmon"

    with read_only(store_dir):
        # The live workers' files are mapped already: counts stay exact.
        served += hammer(srv.base + "/ok", 200)
        during = scrape(srv.base)
        # A new worker cannot create its file or claim a worker slot: it must still boot
        # and serve (before the fix, gunicorn halted: "Worker failed to boot").
        os.kill(srv.proc.pid, signal.SIGTTIN)
        deadline = time.monotonic() + 20
        while len(srv.workers()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        lossy: list[int] = []
        while "metrics store unavailable" not in srv.proc.output() and len(lossy) < 3000:
            lossy += hammer(srv.base + "/ok", 50)  # until some land on the new worker
        alive_during = srv.proc.alive()
        third = set(srv.workers()) - pids

    assert served.count(200) == len(served)
    assert total(during, "softfactory_requests_total", path="/ok") == len(served)
    assert total(during, "sfmon_store_writable") == 0  # the failure, as a self-metric
    assert alive_during and lossy.count(200) == len(lossy)
    assert len(third) == 1 and boots(srv) == 3  # booted once, no boot loop
    out = srv.proc.output()
    assert "has no worker slot" in out and "metrics store unavailable" in out
    assert "Worker failed to boot" not in out

    # Writable again: the worker without a file starts recording on its next request.
    before = total(scrape(srv.base), "softfactory_requests_total", path="/ok")
    after_fix = hammer(srv.base + "/ok", 120)
    samples = scrape(srv.base)
    counted = total(samples, "softfactory_requests_total", path="/ok")
    lines = access_lines(srv, "/ok")
    print(
        f"\nread-only store: served {len(served) + len(lossy) + len(after_fix)}, counted "
        f"{counted:.0f} (lost {len(served) + len(lossy) + len(after_fix) - counted:.0f}, all "
        f"on the worker that could not create its file), lines {lines}"
    )
    assert after_fix.count(200) == len(after_fix)
    assert lines == len(served) + len(lossy) + len(after_fix)  # logging is unaffected
    assert total(samples, "sfmon_store_writable") == 1
    assert total(samples, "softfactory_requests_total", path="/ok") == before + len(after_fix)
    assert len(served) <= before <= len(served) + len(lossy)
    assert total(samples, "softfactory_requests_in_progress") == 0


# -- a database check that hangs ---------------------------------------------------------


def test_hung_check_costs_one_thread_and_probes_answer_within_the_timeout(
    tmp_path: Path,
) -> None:
    store.reset_for_tests(str(tmp_path / "store"))
    release = threading.Event()
    started: list[float] = []

    def hung_database() -> bool:
        started.append(time.monotonic())
        release.wait(30)
        return True

    app = sfmon.Monitor(
        lambda e, s: [],
        namespace="faults_hung",
        access_log=False,
        checks={"database": hung_database},
        check_timeout=0.5,
        check_ttl=0.2,
    )
    try:
        timings = []
        bodies = []
        for _ in range(4):
            t = time.monotonic()
            status, body = call(app, "/api/metrics/health")
            timings.append(time.monotonic() - t)
            bodies.append((status, body))
        t = time.monotonic()
        ready = call(app, "/api/metrics/ready")
        live = call(app, "/api/metrics/live")
        others = time.monotonic() - t
        runs_while_hung = len(started)
        release.set()
        time.sleep(0.3)
        healed = call(app, "/api/metrics/health")
    finally:
        release.set()
        store.reset_for_tests(None)

    print(f"\nhung check: probes answered in {max(timings):.2f}s max (timeout 0.5 s)")
    assert all(b[0].startswith("503") for b in bodies)
    first = json.loads(bodies[0][1])
    assert first["database"] == "unhealthy" and first["status"] == "degraded"
    assert "timed out" in first["checks"]["database"]["error"]
    assert max(timings) < 1.5, timings  # 0.5 s timeout, never the check's 30 s
    assert runs_while_hung == 1  # the hung check is not started again while it runs
    assert ready[0].startswith("503") and live[0].startswith("200") and others < 1.5
    assert healed[0].startswith("200")


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def call(app: Any, path: str) -> tuple[str, bytes]:
    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "x"}
    got: list[str] = []
    body = app(env, lambda status, headers, exc_info=None: got.append(status))
    try:
        return got[0], b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()


@integration
def test_locked_database_under_gunicorn_degrades_health_not_the_api(
    servers: Any, tmp_path: Path
) -> None:
    """The demo's SQLite check against a database held under an exclusive lock."""
    db = tmp_path / "softfactory.sqlite3"
    srv: Server = servers(
        "-w",
        "2",
        "--chdir",
        str(ROOT / "examples" / "softfactory"),
        app="app:app",
        env={"SOFTFACTORY_DB": str(db), "SFMON_CHECK_TIMEOUT": "0.5", "SFMON_CHECK_TTL": "0.2"},
    )
    assert http_get(srv.base + "/api/metrics/health")[0] == 200
    auth = {"Authorization": "Bearer demo_token"}
    con = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        con.execute("BEGIN EXCLUSIVE")  # every reader now blocks (busy timeout 2 s)
        time.sleep(0.3)  # past the cached result's TTL
        t = time.monotonic()
        health = http_get(srv.base + "/api/metrics/health")
        took = time.monotonic() - t
        api = http_get(srv.base + "/api/coocook/chefs", auth)
        live = http_get(srv.base + "/api/metrics/live")
    finally:
        con.execute("ROLLBACK")
        con.close()
    deadline = time.monotonic() + 15
    while http_get(srv.base + "/api/metrics/health")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)

    print(f"\nlocked database: /health answered 503 in {took:.2f}s (timeout 0.5 s)")
    assert health[0] == 503 and took < 1.5, (health, took)
    assert json.loads(health[2])["database"] == "unhealthy"
    assert api[0] == 200 and live[0] == 200
    assert http_get(srv.base + "/api/metrics/health")[0] == 200  # healed


# -- gunicorn worker timeouts ------------------------------------------------------------


@integration
def test_worker_timeout_kills_only_the_slow_request(servers: Any) -> None:
    """``--timeout 2``: the slow request's worker is aborted; everything else is served
    and counted exactly; the aborted request is recorded as a 500 (SystemExit)."""
    srv: Server = servers("-w", "2", "--timeout", "2")
    pids = srv.wait_workers(2)
    slow: list[int] = []
    t = threading.Thread(target=lambda: slow.append(get(srv.base + "/slow?ms=8000")))
    t.start()
    time.sleep(0.3)
    served: list[int] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and t.is_alive():
        served += hammer(srv.base + "/ok", 20, threads=2)
        time.sleep(0.05)
    t.join(30)
    served += hammer(srv.base + "/ok", 50)
    time.sleep(1.0)  # child_exit folds the aborted worker's file
    samples = scrape(srv.base)

    assert slow[0] in (500, -1)  # gunicorn answers 500 (or drops the connection)
    lines = access_lines(srv, "/ok")
    print(
        f"\nworker timeout: served {len(served)} + 1 aborted, counted "
        f"{total(samples, 'softfactory_requests_total'):.0f}, lines {lines} + "
        f"{access_lines(srv, '/slow')}"
    )
    assert served.count(200) == len(served)
    assert total(samples, "softfactory_requests_total", path="/ok") == len(served)
    assert total(samples, "softfactory_request_latency_ms_count", path="/ok") == len(served)
    assert total(samples, "softfactory_requests_total", path="/slow", status="500") == 1
    assert lines == len(served)
    assert total(samples, "softfactory_exceptions_total", type="SystemExit") == 1
    assert total(samples, "softfactory_requests_in_progress") == 0
    out = srv.proc.output()
    assert "WORKER TIMEOUT" in out
    assert len(set(srv.workers()) & pids) == 1 and boots(srv) == 3  # one replacement


# -- sfmon doctor against real services --------------------------------------------------


def doctor(*args: str, mpdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mpdir)}
    return subprocess.run(
        [sys.executable, "-m", "sfmon.cli", "doctor", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@integration
def test_doctor_passes_a_healthy_service(servers: Any) -> None:
    srv: Server = servers("-w", "2")
    srv.wait_workers(2)
    hammer(srv.base + "/ok", 20)

    result = doctor("--url", srv.base, "--config", str(ROOT / "gunicorn.conf.py"), mpdir=srv.mpdir)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "[error]" not in result.stdout
    assert "scrape of" in result.stdout and "took" in result.stdout


@integration
def test_doctor_fails_a_directory_shared_by_two_services(servers: Any, tmp_path: Path) -> None:
    one: Server = servers("-w", "2", sub="one")
    shared = one.mpdir
    two: Server = servers("-w", "2", sub="two", env={"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    # The second start wiped the first one's store (the hazard itself); both write again.
    deadline = time.monotonic() + 20
    parents: set[int] = set()
    while len(parents) < 2 and time.monotonic() < deadline:
        hammer(one.base + "/ok", 20)
        hammer(two.base + "/ok", 20)
        time.sleep(0.3)
        parents = store_parents(shared / "sfmon")

    result = doctor("--url", one.base, mpdir=shared)

    assert parents == {one.proc.pid, two.proc.pid}
    assert result.returncode == 1, result.stdout
    assert "two services share one" in result.stdout


def store_parents(directory: Path) -> set[int]:
    import psutil

    from sfmon.merge import StoreReader

    out = set()
    for pid, _ in StoreReader(str(directory)).snapshot().workers:
        try:
            out.add(psutil.Process(pid).ppid())
        except psutil.Error:
            pass
    return out
