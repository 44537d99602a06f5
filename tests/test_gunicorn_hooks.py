"""gunicorn hooks without gunicorn: directory preparation, folding, wrapping."""

from __future__ import annotations

import os
import shutil
import stat
import types
from pathlib import Path

import pytest

import sfmon
from sfmon import gunicorn_hooks, metrics, store
from sfmon.merge import StoreReader


def app(environ: dict[str, object], start_response: object) -> list[bytes]:
    return [b""]


def test_unset_variable_gets_a_private_directory() -> None:
    env: dict[str, str] = {}

    directory = gunicorn_hooks.prepare_directory(env)

    try:
        root = env["PROMETHEUS_MULTIPROC_DIR"]
        assert directory == os.path.join(root, "sfmon")
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert os.path.exists(os.path.join(directory, "service.json"))
    finally:
        os.environ.pop("SFMON_PRIVATE_MULTIPROC_DIR", None)
        store.configure_directory(None)
        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def test_stale_files_are_wiped_and_others_kept(tmp_path: Path) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "sfmon").mkdir()
    (tmp_path / "sfmon" / "archive.sfm").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("not ours")

    gunicorn_hooks.prepare_directory({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    store.configure_directory(None)

    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sfmon"]
    assert os.listdir(tmp_path / "sfmon") == ["service.json"]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bad_directory_fails_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "mp"
    if kind == "file":
        path.write_text("")

    with pytest.raises(SystemExit, match=str(path)):
        gunicorn_hooks.prepare_directory({"PROMETHEUS_MULTIPROC_DIR": str(path)})


def test_child_exit_folds_only_that_worker(tmp_path: Path) -> None:
    d = str(tmp_path)
    store.reset_for_tests(d)
    c = metrics.counter("hooks_fold_total", "x")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        c.inc(3)
        os.write(w, b"x")
        os._exit(0)
    os.read(r, 1)
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    c.inc()
    try:
        gunicorn_hooks.child_exit(None, types.SimpleNamespace(pid=pid))
        names = sorted(n for n in os.listdir(d) if n.endswith(".sfm"))
        snap = StoreReader(d).snapshot()
    finally:
        store.reset_for_tests(None)

    assert len(names) == 2 and names[0] == "archive.sfm"
    assert names[1].startswith(f"w-{os.getpid()}-")  # ours stays; the child's was folded
    assert snap.families["hooks_fold_total"].series[()] == 4 * store.VALUE_SCALE


def test_wrap_app_never_double_wraps() -> None:
    once = gunicorn_hooks.wrap_app(app)
    flask = pytest.importorskip("flask")
    fapp = flask.Flask("hooks")
    fapp.wsgi_app = sfmon.Monitor(fapp.wsgi_app, namespace="hookwrap")  # type: ignore[method-assign]

    assert isinstance(once, sfmon.Monitor) and once.app is app
    assert gunicorn_hooks.wrap_app(once) is once
    assert gunicorn_hooks.wrap_app(fapp) is fapp
