"""gunicorn server hooks: the store's lifecycle, zero-code wrapping, readiness.

``gunicorn.conf.py`` imports these; each is small and unit-tested without gunicorn.
The master prepares the multiprocess directory before any worker forks, so every
worker (and prometheus_client, if the app uses it) shares one directory.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from . import store

__all__ = [
    "child_exit",
    "on_exit",
    "on_starting",
    "post_worker_init",
    "prepare_directory",
    "when_ready",
    "worker_int",
]

ENV = "PROMETHEUS_MULTIPROC_DIR"
_PRIVATE_MARK = "SFMON_PRIVATE_MULTIPROC_DIR"


def prepare_directory(environ: dict[str, str] | None = None) -> str:
    """Make ``PROMETHEUS_MULTIPROC_DIR`` usable and empty; return sfmon's store dir.

    Unset: a private directory (mode 0700) is created and exported, so workers and
    prometheus_client inherit it. Set but missing, not a directory or not writable:
    ``SystemExit`` with a message naming it. Stale files of a previous run (its
    ``*.db`` files and sfmon's store) are removed; nothing else is touched.
    """
    env = os.environ if environ is None else environ
    path = env.get(ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="sfmon-multiproc-")
        env[ENV] = path
        env[_PRIVATE_MARK] = path
    if not os.path.isdir(path):
        raise SystemExit(f"sfmon: {ENV}={path!r} does not exist or is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"sfmon: {ENV}={path!r} is not writable by this user")
    for name in os.listdir(path):
        if name.endswith(".db"):
            try:
                os.unlink(os.path.join(path, name))
            except OSError as exc:
                raise SystemExit(f"sfmon: cannot remove stale {name} in {ENV}={path!r}: {exc}")
    sfmon_dir = os.path.join(path, "sfmon")
    if os.path.isdir(sfmon_dir):
        shutil.rmtree(sfmon_dir)
    os.makedirs(sfmon_dir, mode=0o700)
    store.configure_directory(sfmon_dir)
    store.write_service_meta(sfmon_dir)
    return sfmon_dir


def on_starting(server: Any) -> None:
    """Prepare the multiprocess directory and sfmon's JSON logging for gunicorn."""
    prepare_directory()
    from . import readiness

    readiness.reset(store.store_directory())
    configure_service_logging()


def configure_service_logging(environ: dict[str, str] | None = None) -> None:
    """JSON logs for the whole service, set up once in the master before workers fork.

    Destinations: stdout, ``<log dir>/app.log``, ``access.log``, ``errors.log`` with
    ``SFMON_LOG_DIR`` (default ``logs``); ``SFMON_LOGGING=0`` leaves logging alone.
    """
    env = os.environ if environ is None else environ
    if env.get("SFMON_LOGGING", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    from .logs import configure_logging

    log_dir = env.get("SFMON_LOG_DIR", "logs")
    configure_logging(None, log_file=os.path.join(log_dir, "app.log"), log_dir=log_dir)


def when_ready(server: Any) -> None:
    """The master is listening: workers may report ready once booted."""
    from . import readiness

    readiness.mark_started(store.store_directory())


def post_worker_init(worker: Any) -> None:
    """Zero-code mode: wrap the worker's loaded app in a Monitor unless it has one."""
    worker.wsgi = wrap_app(worker.wsgi)
    from . import readiness, system

    try:
        directory = store.store_directory()
        readiness.install_drain_handler(directory)
        system.claim_slot(directory)
    except OSError as exc:  # a broken store must never fail the boot (gunicorn would halt)
        print(f"sfmon: worker {worker.pid} has no worker slot: {exc!r}", file=sys.stderr)


def wrap_app(app: Any) -> Any:
    """Return *app* wrapped in a :class:`~sfmon.Monitor` (options from ``SFMON_*``),
    or *app* itself when it already is (or contains, as Flask's ``wsgi_app``) one."""
    from .middleware import Monitor

    if isinstance(app, Monitor) or isinstance(getattr(app, "wsgi_app", None), Monitor):
        return app
    return Monitor(app)


def child_exit(server: Any, worker: Any) -> None:
    """Fold the exited worker's store file into the archive (in the master)."""
    from .compact import fold_dead_workers

    directory = store.store_directory()
    prefix = f"{store.WORKER_PREFIX}{worker.pid}-"
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
        if names:
            fold_dead_workers(directory, only=names)
    except Exception as exc:  # never take the master down; the scrape sweep retries
        print(f"sfmon: folding worker {worker.pid} failed: {exc!r}", file=sys.stderr)
    path = os.environ.get(ENV)
    if path:
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, path)  # type: ignore[no-untyped-call]
            from .pcfold import fold_prometheus_client_files

            fold_prometheus_client_files(path, worker.pid, directory)
        except Exception as exc:
            print(
                f"sfmon: folding prometheus_client files of {worker.pid} failed: {exc!r}",
                file=sys.stderr,
            )


def worker_int(worker: Any) -> None:
    """SIGINT/SIGQUIT in a worker: nothing to flush (the store is memory-mapped)."""


def on_exit(server: Any) -> None:
    """Remove the private multiprocess directory this master created, if any."""
    private = os.environ.get(_PRIVATE_MARK)
    if private and private == os.environ.get(ENV):
        shutil.rmtree(private, ignore_errors=True)
