"""The ``sfmon`` command: ``sfmon doctor`` checks a deployment and says what is wrong.

Each finding is one plain sentence with a fix; the exit code is 1 when any finding is
an error, else 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

__all__ = ["doctor", "main"]

OK, WARN, ERROR = "ok", "warning", "error"
Finding = tuple[str, str]


def _check_dir(env: dict[str, str]) -> list[Finding]:
    out: list[Finding] = []
    path = env.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        out.append(
            (
                WARN,
                "PROMETHEUS_MULTIPROC_DIR is unset: under gunicorn each worker would "
                "keep its own metrics unless gunicorn.conf.py's on_starting hook "
                "creates a private directory (it does when you use sfmon's config).",
            )
        )
        return out
    if not os.path.isdir(path):
        out.append(
            (
                ERROR,
                f"PROMETHEUS_MULTIPROC_DIR={path} does not exist: create it "
                "(empty, owned by the service user) before starting gunicorn.",
            )
        )
        return out
    if not os.access(path, os.W_OK | os.X_OK):
        out.append((ERROR, f"PROMETHEUS_MULTIPROC_DIR={path} is not writable by this user."))
        return out
    out.append((OK, f"PROMETHEUS_MULTIPROC_DIR={path} exists and is writable."))
    out.extend(_check_store(os.path.join(path, "sfmon")))
    return out


def _check_store(directory: str) -> list[Finding]:
    from .compact import pid_exists
    from .merge import StoreReader
    from .store import read_service_meta

    if not os.path.isdir(directory):
        return [(OK, "no sfmon store yet (nothing has been recorded).")]
    out: list[Finding] = []
    try:
        snap = StoreReader(directory).snapshot()
    except OSError as exc:
        return [(ERROR, f"the store in {directory} cannot be read: {exc}")]
    meta = (
        read_service_meta(directory)
        if os.path.exists(os.path.join(directory, "service.json"))
        else {}
    )
    master = meta.get("master_pid")
    masters = set()
    import psutil

    for pid, _ in snap.workers:
        try:
            masters.add(psutil.Process(pid).ppid())
        except psutil.Error:
            continue
    if len(masters) > 1:
        out.append(
            (
                ERROR,
                f"the store is written by workers of {len(masters)} different "
                f"parents ({sorted(masters)}): two services share one "
                "PROMETHEUS_MULTIPROC_DIR; give each its own.",
            )
        )
    if snap.dead:
        out.append(
            (
                WARN,
                f"{len(snap.dead)} store file(s) of dead workers are not folded: "
                "gunicorn's child_exit hook is missing (use sfmon's gunicorn.conf.py);"
                " the next scrape folds them.",
            )
        )
    if snap.files_skipped:
        out.append(
            (
                ERROR,
                f"{len(snap.files_skipped)} store file(s) are unreadable: "
                f"{', '.join(snap.files_skipped[:5])}.",
            )
        )
    if master is not None and not snap.workers and not pid_exists(int(master)):
        out.append(
            (
                WARN,
                f"stale store: its service (master pid {master}) is gone; it is "
                "wiped when gunicorn starts with sfmon's on_starting hook.",
            )
        )
    if not out:
        out.append((OK, f"store: {snap.files_read} file(s), {len(snap.workers)} live worker(s)."))
    return out


def _check_config(path: str) -> list[Finding]:
    try:
        namespace = runpy.run_path(path)
    except Exception as exc:
        return [(ERROR, f"{path} does not load: {exc!r}")]
    out: list[Finding] = []
    from . import gunicorn_hooks

    for hook in ("on_starting", "child_exit", "post_worker_init"):
        fn = namespace.get(hook)
        if fn is None:
            out.append(
                (
                    ERROR,
                    f"{path} does not define gunicorn's {hook} hook: import it from "
                    "sfmon.gunicorn_hooks.",
                )
            )
        elif fn is not getattr(gunicorn_hooks, hook) and "sfmon" not in getattr(
            fn, "__module__", ""
        ):
            out.append(
                (
                    WARN,
                    f"{path}'s {hook} is not sfmon's; make sure it calls "
                    f"sfmon.gunicorn_hooks.{hook}.",
                )
            )
    if not out:
        out.append((OK, f"{path} installs sfmon's gunicorn hooks."))
    return out


def _check_import_order(app: str) -> list[Finding]:
    module = app.split(":", 1)[0]
    try:
        importlib.import_module(module)
    except Exception as exc:
        return [(ERROR, f"cannot import {module}: {exc!r}")]
    values = sys.modules.get("prometheus_client.values")
    if values is None:
        return [(OK, f"{module} does not use prometheus_client.")]
    multiprocess = values.ValueClass.__name__ != "MutexValue"
    if bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) != multiprocess:
        return [
            (
                ERROR,
                "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was "
                "set: set the variable in the start-up environment, not in Python.",
            )
        ]
    return [(OK, "prometheus_client's mode matches PROMETHEUS_MULTIPROC_DIR.")]


def _check_url(url: str, slow: float) -> list[Finding]:
    target = url.rstrip("/")
    if not target.endswith("/prometheus"):
        target += "/api/metrics/prometheus"
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(target, timeout=max(slow * 4, 5)) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        return [(ERROR, f"scrape of {target} failed: HTTP {exc.code}.")]
    except OSError as exc:
        return [(ERROR, f"scrape of {target} failed: {exc}.")]
    took = time.perf_counter() - started
    if b"_requests_total" not in body and b"sfmon_store_files" not in body:
        return [(ERROR, f"{target} answered but not with sfmon's exposition.")]
    if took > slow:
        return [
            (
                WARN,
                f"scrape of {target} took {took:.2f}s (> {slow:g}s): check the store "
                "file count (sfmon_store_files) and that child_exit folds workers.",
            )
        ]
    return [(OK, f"scrape of {target} took {took * 1000:.1f} ms ({len(body)} bytes).")]


def _check_speedups() -> list[Finding]:
    from ._accel import speedups

    if speedups is not None:
        return [(OK, "C speedups are built and in use (sfmon._speedups).")]
    if os.environ.get("SFMON_SPEEDUPS", "").strip().lower() in {"0", "false", "no", "off"}:
        return [(OK, "C speedups are off (SFMON_SPEEDUPS=0): the pure-Python path runs.")]
    return [
        (
            WARN,
            "C speedups are not built: sfmon runs its pure-Python path (same results, about "
            "4 µs more per request). Reinstall sfmon with gcc and the Python headers "
            "(Debian: gcc python3-dev).",
        )
    ]


def doctor(argv: Sequence[str] | None = None) -> int:
    """Run the checks; print one line per finding; return the exit code."""
    ap = argparse.ArgumentParser(prog="sfmon doctor", description=__doc__)
    ap.add_argument("--config", help="gunicorn config file to check (e.g. gunicorn.conf.py)")
    ap.add_argument("--app", help="module:app to import, checking prometheus_client's mode")
    ap.add_argument("--url", help="base URL of a running server to scrape")
    ap.add_argument("--slow", type=float, default=1.0, help="seconds a scrape may take")
    args = ap.parse_args(argv)
    findings = _check_dir(dict(os.environ)) + _check_speedups()
    if args.config:
        findings += _check_config(args.config)
    if args.app:
        findings += _check_import_order(args.app)
    if args.url:
        findings += _check_url(args.url, args.slow)
    for level, text in findings:
        print(f"[{level}] {text}")
    return 1 if any(level == ERROR for level, _ in findings) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sfmon`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: sfmon doctor [--config FILE] [--app MODULE:APP] [--url URL]")
        return 0 if args else 2
    if args[0] == "doctor":
        return doctor(args[1:])
    print(f"sfmon: unknown command {args[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
