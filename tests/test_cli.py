"""``sfmon doctor``: plain findings and exit codes for broken deployments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import ROOT

from sfmon import cli, store


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["doctor", *args])
    return code, capsys.readouterr().out


def test_unset_directory_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    code, out = run(capsys)

    assert code == 0 and "[warning] PROMETHEUS_MULTIPROC_DIR is unset" in out


def test_missing_directory_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "gone"))

    code, out = run(capsys)

    assert code == 1 and "does not exist" in out


def test_dead_unfolded_workers_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sfmon import metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    os.makedirs(tmp_path / "sfmon")
    store.reset_for_tests(str(tmp_path / "sfmon"))
    c = metrics.counter("doctor_test_total", "x")
    pid = os.fork()
    if pid == 0:
        c.inc()
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        code, out = run(capsys)
    finally:
        store.reset_for_tests(None)

    assert code == 0 and "not folded" in out and "child_exit" in out


def test_config_without_hooks_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "bare.conf.py"
    conf.write_text("workers = 2\n")

    code, out = run(capsys, "--config", str(conf))
    good, out_good = run(capsys, "--config", str(ROOT / "gunicorn.conf.py"))

    assert code == 1 and "child_exit" in out
    assert good in (0, 1) and "installs sfmon's gunicorn hooks" in out_good


def test_unreachable_server_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    from support import free_port

    code, out = run(capsys, "--url", f"http://127.0.0.1:{free_port()}")

    assert code == 1 and "scrape of" in out and "failed" in out


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2


def test_speedups_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sfmon import _accel

    code, out = run(capsys)
    assert "[ok] C speedups are built and in use" in out

    monkeypatch.setattr(_accel, "speedups", None)
    code, out = run(capsys)
    assert "[warning] C speedups are not built" in out and code == 0

    monkeypatch.setenv("SFMON_SPEEDUPS", "0")
    code, out = run(capsys)
    assert "[ok] C speedups are off (SFMON_SPEEDUPS=0)" in out
