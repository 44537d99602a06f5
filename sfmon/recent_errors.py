"""A bounded list of recent error requests, shared by every worker of the service.

Workers append one JSON line per error to a file in the store directory (one
``write`` of one short line, under a shared ``flock``); when the file passes a
size bound, the appender that notices rewrites it with the newest entries (under
the exclusive lock). Readers take the newest *limit* lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
from typing import Any

__all__ = ["RecentErrors"]

FILE = "recent-errors.jsonl"
LOCK = "recent-errors.lock"
MAX_BYTES = 128 * 1024
KEEP = 200
MAX_FIELD = 200


class RecentErrors:
    """Append and read the shared ring of recent errors in *directory*.

    .. code-block:: python

        ring = RecentErrors(store_directory())
        ring.add(request_id="r1", method="GET", route="/x", status=500,
                 exception="KeyError")
        ring.read(limit=20)
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILE)
        self._failed = False

    def _lock(self, mode: int) -> int:
        fd = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, mode)
        return fd

    def add(
        self, *, request_id: str, method: str, route: str, status: int, exception: str | None
    ) -> None:
        """Append one error; never raises (failures are reported once on stderr)."""
        entry = {
            "time": time.time(),
            "request_id": request_id[:MAX_FIELD],
            "method": method[:MAX_FIELD],
            "route": route[:MAX_FIELD],
            "status": status,
            "exception": exception[:MAX_FIELD] if exception else None,
            "pid": os.getpid(),
        }
        line = (json.dumps(entry) + "\n").encode()
        try:
            fd = self._lock(fcntl.LOCK_SH)
            try:
                out = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(out, line)
                    size = os.fstat(out).st_size
                finally:
                    os.close(out)
            finally:
                os.close(fd)
            if size > MAX_BYTES:
                self._trim()
        except OSError as exc:
            if not self._failed:
                self._failed = True
                print(f"sfmon: cannot record recent errors: {exc!r}", file=sys.stderr)

    def _trim(self) -> None:
        fd = self._lock(fcntl.LOCK_EX)
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines(keepends=True)
            if sum(map(len, lines)) <= MAX_BYTES:
                return  # another worker trimmed already
            tmp_fd, tmp = tempfile.mkstemp(prefix=".tmp-errors-", dir=self.directory)
            with os.fdopen(tmp_fd, "wb") as f:
                f.writelines(lines[-KEEP:])
            os.replace(tmp, self.path)
        finally:
            os.close(fd)

    def read(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest *limit* errors, newest first."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                data = f.read()
        except OSError:
            return []
        out = []
        for raw in reversed(data.splitlines()):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # the first, partial line of the tail
            if isinstance(entry, dict):
                out.append(entry)
            if len(out) >= limit:
                break
        return out
