"""Start-up and draining state shared by the master and its workers (readiness).

The state lives in two marker files in the store directory, so whichever worker
answers ``/ready`` sees what the master did: ``started`` once the server is ready,
``draining`` once a graceful shutdown began. Without gunicorn (no hooks ran) a
service counts as started as soon as it serves.
"""

from __future__ import annotations

import os
import signal
from typing import Any

__all__ = [
    "install_drain_handler",
    "is_draining",
    "is_started",
    "mark_draining",
    "mark_started",
    "reset",
]

_STARTED = "started"
_DRAINING = "draining"
_HOOKED = "hooked"
_local_draining = False


def _touch(directory: str, name: str) -> None:
    # 0600 like every file of the store, whatever the umask.
    os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT, 0o600))


def reset(directory: str) -> None:
    """The master is starting: not started, not draining."""
    for name in (_STARTED, _DRAINING):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    _touch(directory, _HOOKED)


def mark_started(directory: str) -> None:
    """Start-up is done (gunicorn's ``when_ready``)."""
    _touch(directory, _STARTED)


def mark_draining(directory: str) -> None:
    """A graceful shutdown began: readiness must now fail."""
    global _local_draining
    _local_draining = True
    try:
        _touch(directory, _DRAINING)
    except OSError:
        pass


def is_started(directory: str) -> bool:
    """Whether start-up is done (always true when no gunicorn hooks manage it)."""
    if not os.path.exists(os.path.join(directory, _HOOKED)):
        return True
    return os.path.exists(os.path.join(directory, _STARTED))


def is_draining(directory: str) -> bool:
    """Whether this process or the service is shutting down gracefully."""
    return _local_draining or os.path.exists(os.path.join(directory, _DRAINING))


def install_drain_handler(directory: str) -> None:
    """Mark draining on SIGTERM in this process, then run the previous handler."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        mark_draining(directory)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
