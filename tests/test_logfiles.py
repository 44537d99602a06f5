"""Multi-process-safe rotating log files: no line lost, duplicated or torn; retention;
failing destinations."""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sfmon import logfailures
from sfmon.logfiles import LogFile, _Periods, write_all

ROOT = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def _fresh_failure_counts() -> Iterator[None]:
    logfailures._failures.clear()
    logfailures._reported.clear()
    yield
    logfailures._failures.clear()
    logfailures._reported.clear()


# -- periods and names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "interval", "utc", "t", "suffix"),
    [
        pytest.param("midnight", None, True, 1772015445.5, "2026-02-25", id="utc midnight"),
        pytest.param("midnight", None, False, None, None, id="local midnight"),
        pytest.param("midnight", 1.0, True, 1772015445.5, "2026-02-25_10-30-45", id="1 s"),
        pytest.param("midnight", 0.25, True, 1772015445.6, "2026-02-25_10-30-45-500", id="0.25 s"),
    ],
)
def test_period_names_round_trip(
    when: str, interval: float | None, utc: bool, t: float | None, suffix: str | None
) -> None:
    periods = _Periods(when, interval, utc)
    t = time.time() if t is None else t
    index = periods.index(t)

    assert periods.start(index) <= t < periods.start(index + 1)
    assert periods.parse(periods.suffix(index)) == index
    if suffix is not None:
        assert periods.suffix(index) == suffix
    if not utc:
        assert periods.suffix(index) == dt.date.fromtimestamp(t).isoformat()
        assert dt.datetime.fromtimestamp(periods.start(index + 1)).time() == dt.time(0, 0)


def test_bad_rotation_options_raise() -> None:
    with pytest.raises(ValueError, match="rotate_when"):
        _Periods("hourly", None, True)
    with pytest.raises(ValueError, match="rotate_interval_seconds"):
        _Periods("midnight", 0, True)
    with pytest.raises(ValueError, match="retention"):
        LogFile("/nonexistent/x.log", retention=0)


# -- single process -------------------------------------------------------------------


def archives(directory: Path, name: str = "app.log") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(name + "."))


def test_rotation_renames_by_period_and_reopens(tmp_path: Path) -> None:
    f = LogFile(tmp_path / "app.log", rotate_interval_seconds=0.2)
    for i in range(6):
        f.write(b"%d\n" % i)
        time.sleep(0.21)
    f.close()

    names = archives(tmp_path)
    assert len(names) >= 5
    seen = []
    for name in [*names, "app.log"]:
        seen += (tmp_path / name).read_bytes().split()
    assert sorted(seen) == [b"%d" % i for i in range(6)]


def test_stale_file_is_rotated_at_start_never_over_an_archive(tmp_path: Path) -> None:
    live = tmp_path / "app.log"
    live.write_text('{"old": 1}\n')
    two_days_ago = time.time() - 2 * 86400
    os.utime(live, (two_days_ago, two_days_ago))
    day = dt.datetime.fromtimestamp(two_days_ago, dt.timezone.utc).date().isoformat()
    (tmp_path / f"app.log.{day}").write_text('{"older": 1}\n')

    f = LogFile(live)
    f.write(b'{"new": 1}\n')
    f.close()

    assert live.read_text() == '{"new": 1}\n'
    assert (tmp_path / f"app.log.{day}").read_text() == '{"older": 1}\n'
    assert (tmp_path / f"app.log.{day}.1").read_text() == '{"old": 1}\n'


def test_retention_deletes_only_old_archives(tmp_path: Path) -> None:
    today = dt.datetime.now(dt.timezone.utc).date()
    old = (today - dt.timedelta(days=40)).isoformat()
    recent = (today - dt.timedelta(days=10)).isoformat()
    keep = [f"app.log.{recent}", "app.log.notes", f"access.log.{old}", "app.log"]
    for name in [f"app.log.{old}", f"app.log.{old}.1", *keep]:
        (tmp_path / name).write_text("x\n")

    LogFile(tmp_path / "app.log", retention=30).close()

    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(keep)


def test_retention_during_fast_rotation(tmp_path: Path) -> None:
    f = LogFile(tmp_path / "app.log", rotate_interval_seconds=0.1, retention=2)
    deadline = time.time() + 1.2
    while time.time() < deadline:
        f.write(b"x\n")
        time.sleep(0.01)
    f.close()

    # ~12 rotations happened; only archives of the last two periods remain.
    assert 1 <= len(archives(tmp_path)) <= 3


def test_threads_share_one_file_across_rotations(tmp_path: Path) -> None:
    f = LogFile(tmp_path / "app.log", rotate_interval_seconds=0.05)

    def writer(n: int) -> None:
        for i in range(2000):
            f.write(b'{"t":%d,"seq":%d}\n' % (n, i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()

    result = check(tmp_path, "app.log", {n: 2000 for n in range(8)}, key="t")
    assert (result["lost"], result["dup"], result["torn"]) == (0, 0, 0)


# -- several processes ----------------------------------------------------------------


def _writer(
    path: str,
    lines: int,
    interval: float,
    pace: bool,
    start: Any,
    shared: LogFile | None,
) -> None:
    f = shared or LogFile(path, rotate_interval_seconds=interval)
    pid = os.getpid()
    pad = b"x" * 180
    start.wait()
    for i in range(lines):
        f.write(b'{"proc":%d,"seq":%d,"ts":%r,"pad":"%s"}\n' % (pid, i, time.time(), pad))
        if pace and i % 100 == 99:
            time.sleep(0.025)
    f.close()


def run_writers(
    directory: Path, procs: int, lines: int, interval: float, *, pace: bool, inherit: bool
) -> dict[int, int]:
    path = str(directory / "app.log")
    shared = LogFile(path, rotate_interval_seconds=interval) if inherit else None
    start = FORK.Event()
    workers = [
        FORK.Process(target=_writer, args=(path, lines, interval, pace, start, shared))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    start.set()
    try:
        for w in workers:
            w.join(60)
            assert w.exitcode == 0, f"writer {w.pid} exit code {w.exitcode}"
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()
        if shared is not None:
            shared.close()
    return {int(w.pid or 0): lines for w in workers}


def check(
    directory: Path, name: str, expected: dict[int, int], key: str = "proc"
) -> dict[str, Any]:
    """Read back the live file and every archive; classify every line."""
    seen: Counter[tuple[int, int]] = Counter()
    torn = 0
    by_file: dict[str, list[dict[str, Any]]] = {}
    for p in directory.iterdir():
        if p.name != name and not p.name.startswith(name + "."):
            continue
        if p.name.endswith(".lock"):
            continue
        by_file[p.name] = []
        with open(p, "rb") as fh:
            for raw in fh:
                try:
                    line = json.loads(raw)
                    seen[(line[key], line["seq"])] += 1
                    by_file[p.name].append(line)
                except (ValueError, KeyError):
                    torn += 1
    wanted = {(k, i) for k, n in expected.items() for i in range(n)}
    return {
        "lost": len(wanted - set(seen)),
        "dup": sum(c - 1 for c in seen.values() if c > 1),
        "torn": torn,
        "files": by_file,
    }


def test_four_processes_rotating_every_second_lose_nothing(tmp_path: Path) -> None:
    """The issue's test: 4 writer processes x 20,000 lines, paced over ~5 s, with the
    file rotated every second: 0 lost, 0 duplicated, 0 torn, each line in the file of
    its own period."""
    expected = run_writers(tmp_path, 4, 20_000, 1.0, pace=True, inherit=False)

    result = check(tmp_path, "app.log", expected)

    assert (result["lost"], result["dup"], result["torn"]) == (0, 0, 0)
    periods = _Periods("midnight", 1.0, True)
    assert len(result["files"]) >= 4  # at least three rotations happened
    for name, lines in result["files"].items():
        if name == "app.log" or not lines:
            continue  # a period in which a loaded machine wrote nothing leaves an empty file
        index = periods.parse(name[len("app.log.") :])
        assert index is not None, name
        end = periods.start(index + 1)
        # A line is never written into a period's file after that period ended.
        assert max(x["ts"] for x in lines) < end, name


@pytest.mark.parametrize("inherit", [False, True], ids=["per-process", "inherited-fork"])
def test_processes_unpaced_with_many_rotations(tmp_path: Path, inherit: bool) -> None:
    """Stress: no pacing, a rotation every 10 ms (~20 rotations); the file either opened
    in each process or created before fork (gunicorn master) and inherited."""
    expected = run_writers(tmp_path, 4, 20_000, 0.01, pace=False, inherit=inherit)

    result = check(tmp_path, "app.log", expected)

    assert (result["lost"], result["dup"], result["torn"]) == (0, 0, 0)
    assert len(result["files"]) >= 5


def _pair_writer(directory: str, lines: int, interval: float, start: Any) -> None:
    files = tuple(
        LogFile(f"{directory}/{name}", rotate_interval_seconds=interval)
        for name in ("app.log", "access.log")
    )
    pid = os.getpid()
    start.wait()
    for i in range(lines):
        write_all(files, b'{"proc":%d,"seq":%d,"pad":"%s"}\n' % (pid, i, b"x" * 150), time.time())
        if i % 25 == 24:
            time.sleep(0.002)  # over several rotation periods
    for f in files:
        f.close()


def test_write_all_processes_rotating_lose_nothing(tmp_path: Path) -> None:
    """The access-log fast path (one line to app.log and access.log per call, the
    caller's clock) keeps every guarantee of LogFile.write across rotations."""
    start = FORK.Event()
    workers = [
        FORK.Process(target=_pair_writer, args=(str(tmp_path), 6000, 0.05, start))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0

    for name in ("app.log", "access.log"):
        result = check(tmp_path, name, {int(w.pid or 0): 6000 for w in workers})
        assert (result["lost"], result["dup"], result["torn"]) == (0, 0, 0), name
        assert len(archives(tmp_path, name)) >= 2, name  # it did rotate
    assert logfailures.log_write_failures() == {}


def test_write_all_counts_failures_per_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = LogFile(tmp_path / "good.log")
    bad = LogFile(tmp_path / "bad.log", check_interval=60)
    closed = LogFile(tmp_path / "closed.log")
    closed.close()
    read_only = os.open(os.devnull, os.O_RDONLY)
    os.dup2(read_only, bad._fd)  # writes now fail with EBADF
    os.close(read_only)

    for _ in range(3):
        write_all((bad, closed, good), b"line\n", time.time())
    bad.close()
    good.close()

    assert (tmp_path / "good.log").read_bytes() == b"line\n" * 3
    assert logfailures.log_write_failures() == {"bad.log": 3}  # a closed file is silent
    assert capsys.readouterr().err.count("cannot write log destination 'bad.log'") == 1


# -- failing destinations -------------------------------------------------------------


def test_removed_directory_counts_reports_once_and_recovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    f = LogFile(d / "app.log", check_interval=0.05)
    assert f.write(b"before\n")
    shutil.rmtree(d)
    time.sleep(0.1)

    results = [f.write(b"lost\n") for _ in range(50)]
    d.mkdir()
    time.sleep(0.1)
    after = f.write(b"after\n")
    f.close()

    assert results == [False] * 50
    assert logfailures.log_write_failures() == {"app.log": 50}
    assert capsys.readouterr().err.count("sfmon: cannot write log destination 'app.log'") == 1
    assert after is True
    assert (d / "app.log").read_bytes() == b"after\n"


CHILD = r"""
import json, logging, os, resource, sys
directory, mode = sys.argv[1], sys.argv[2]
from sfmon.logs import configure_logging, log_write_failures
import sfmon.metrics  # everything imported before privileges are dropped
if mode == "fsize":
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
elif mode == "readonly" and os.geteuid() == 0:
    os.setgid(65534)  # root ignores file modes: become nobody to make them bite
    os.setuid(65534)
configure_logging(log_file=os.path.join(directory, "app.log"))
log = logging.getLogger("child")
for i in range(400):
    log.info("line %d %s", i, "x" * 100)
print("FAILURES " + json.dumps(log_write_failures()), flush=True)
"""


def run_child(directory: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, directory, mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
    )


def assert_child_kept_going(out: subprocess.CompletedProcess[str]) -> dict[str, int]:
    assert out.returncode == 0, out.stderr
    *lines, last = out.stdout.splitlines()
    assert [json.loads(x)["message"] for x in lines] == [
        f"line {i} {'x' * 100}" for i in range(400)
    ]
    assert out.stderr.count("sfmon: cannot write log destination 'app.log'") == 1
    assert "Traceback" not in out.stderr
    failures: dict[str, int] = json.loads(last.removeprefix("FAILURES "))
    return failures


def test_file_size_limit_in_a_child_process(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (what a full disk looks like): the process keeps running, stdout
    keeps getting every line, the file failures are counted and reported once."""
    out = run_child(str(tmp_path), "fsize")

    failures = assert_child_kept_going(out)
    assert 200 < failures["app.log"] < 400
    raw = (tmp_path / "app.log").read_bytes()
    assert len(raw) <= 20_000
    complete = raw.split(b"\n")[:-1]  # a write cut at the limit may leave one partial line
    assert all(json.loads(x)["logger"] == "child" for x in complete)


def test_read_only_directory_in_a_child_process() -> None:
    directory = tempfile.mkdtemp(prefix="sfmon-ro-")
    try:
        Path(directory, "app.log").write_text("")
        os.chmod(Path(directory, "app.log"), 0o444)
        os.chmod(directory, 0o555)

        out = run_child(directory, "readonly")

        failures = assert_child_kept_going(out)
        assert failures == {"app.log": 400}
        assert Path(directory, "app.log").read_text() == ""
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory)


def test_check_interval_notices_external_rotation(tmp_path: Path) -> None:
    """logrotate-style rename with rotation off: the file is reopened within the check
    interval, the renamed file keeps what was written before."""
    f = LogFile(tmp_path / "app.log", rotate_when="never", check_interval=0.05)
    f.write(b"one\n")
    os.rename(tmp_path / "app.log", tmp_path / "app.log.1")
    time.sleep(0.1)
    f.write(b"two\n")
    f.close()

    assert (tmp_path / "app.log.1").read_bytes() == b"one\n"
    assert (tmp_path / "app.log").read_bytes() == b"two\n"
    assert not (tmp_path / ".app.log.lock").exists()
    assert math.isinf(f._next_rollover)
