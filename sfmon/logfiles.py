"""Log files that several processes append to, rotated daily without losing a line.

Every process appends whole lines with one ``os.write`` on an ``O_APPEND`` descriptor;
whichever process first passes the rotation time renames the file under an ``flock``,
and the others notice the new file and reopen it (see ``docs/logging.md``).
"""

from __future__ import annotations

import calendar
import datetime as _dt
import fcntl
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from typing import Any

from .logfailures import log_write_failures, record_write_failure

__all__ = [
    "DailyRotatingFileHandler",
    "LogFile",
    "log_write_failures",
    "record_write_failure",
    "write_all",
]

_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

# -- rotation periods -----------------------------------------------------------------


class _Periods:
    """Maps times to integer period indices, and indices to file-name suffixes and back."""

    def __init__(self, when: str, interval: float | None, utc: bool) -> None:
        if interval is not None:
            if not interval > 0 or math.isinf(interval):
                raise ValueError(f"rotate_interval_seconds must be > 0, got {interval!r}")
            self.kind = "interval"
        elif when == "midnight":
            self.kind = "utc" if utc else "local"
        elif when == "never":
            self.kind = "never"
        else:
            raise ValueError(f"rotate_when must be 'midnight' or 'never', got {when!r}")
        self.interval = float(interval or 86400)
        # Sub-second or fractional intervals need milliseconds to keep names distinct.
        self.millis = self.interval != int(self.interval)

    @property
    def rotating(self) -> bool:
        return self.kind != "never"

    def index(self, t: float) -> int:
        if self.kind == "local":
            return _dt.date.fromtimestamp(t).toordinal()
        if self.kind == "never":
            return 0
        return math.floor(t / self.interval)

    def start(self, index: int) -> float:
        if self.kind == "local":
            d = _dt.date.fromordinal(index)
            # mktime with isdst=-1 resolves DST, so a 23- or 25-hour day ends at local midnight.
            return time.mktime((d.year, d.month, d.day, 0, 0, 0, 0, 0, -1))
        if self.kind == "never":
            return math.inf if index > 0 else -math.inf
        return index * self.interval

    def suffix(self, index: int) -> str:
        if self.kind == "local":
            return _dt.date.fromordinal(index).isoformat()
        if self.kind == "utc":
            return _dt.date.fromordinal(index + _EPOCH_ORDINAL).isoformat()
        start = index * self.interval
        text = time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime(math.floor(start)))
        if self.millis:
            text += f"-{round((start - math.floor(start)) * 1000):03d}"
        return text

    def parse(self, suffix: str) -> int | None:
        try:
            if self.kind in ("local", "utc"):
                ordinal = _dt.date.fromisoformat(suffix).toordinal()
                return ordinal if self.kind == "local" else ordinal - _EPOCH_ORDINAL
            m = re.fullmatch(r"(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)(?:-(\d{3}))?", suffix)
            if m is None:
                return None
            secs = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d_%H-%M-%S"))
            return round((secs + int(m.group(2) or 0) / 1000) / self.interval)
        except ValueError:
            return None


# -- the shared file ------------------------------------------------------------------

_instances: weakref.WeakSet[LogFile] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork time; it does not exist here.
    for f in list(_instances):
        f._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LogFile:
    """A log file that many processes and threads append whole lines to, with rotation.

    :meth:`write` appends one line with a single ``os.write`` on an ``O_APPEND``
    descriptor, so lines of different writers never interleave. At the first write at
    or after the period's end (midnight, or every *rotate_interval_seconds*) a process
    takes an ``flock`` on ``.<name>.lock``: if the file still belongs to an older period
    it renames it to ``<name>.<period>`` (never over an existing file) and creates a new
    one; otherwise another process already did and it just reopens. Rotated files older
    than *retention* periods are deleted. Every *check_interval* seconds the path is
    also checked, so external rotation or a removed file is noticed. Errors never raise:
    they are counted by :func:`record_write_failure` and the write is dropped.

    :param path: the live file, e.g. ``logs/app.log``.
    :param destination: the name used in failure counts (default: the file name).
    :param rotate_when: ``"midnight"`` or ``"never"`` (external rotation only).
    :param rotate_interval_seconds: rotate every so many seconds instead (tests).
    :param utc: midnight in UTC (default) or local time.
    :param retention: rotated periods to keep; ``None`` keeps all.
    :param check_interval: seconds between checks of the path for external changes.

    .. code-block:: python

        f = LogFile("logs/access.log", retention=14)
        f.write(b'{"message": "hello"}\\n')
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        destination: str | None = None,
        rotate_when: str = "midnight",
        rotate_interval_seconds: float | None = None,
        utc: bool = True,
        retention: int | None = None,
        check_interval: float = 1.0,
        mode: int = 0o644,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.destination = destination or os.path.basename(self.path)
        self._periods = _Periods(rotate_when, rotate_interval_seconds, utc)
        if retention is not None and retention < 1:
            raise ValueError(f"retention must be >= 1 or None, got {retention!r}")
        self.retention = retention
        self._check_interval = float(check_interval)
        self._mode = mode
        directory, name = os.path.split(self.path)
        self._dir, self._name = directory, name
        self._lock_path = os.path.join(directory, f".{name}.lock")
        self._archive_re = re.compile(re.escape(name) + r"\.([0-9][0-9_-]*)(?:\.(\d+))?")
        self._lock = threading.Lock()
        self._fd = -1  # stays the same number for the object's life (dup2 on reopen)
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) behind _fd
        self._ok = False
        self._closed = False
        self._error: BaseException | None = None
        self._lock_fd = -1
        self._lock_pid = 0
        self._next_check = -math.inf
        self._next_rollover = -math.inf
        _instances.add(self)
        self._maintain(time.time())

    # -- hot path ---------------------------------------------------------------------

    def write(self, data: bytes, now: float | None = None) -> bool:
        """Append *data* (one or more whole lines); return whether it was written.

        *now* (default: the current time) decides whether maintenance is due; a caller
        that has just read the clock passes its reading.
        """
        if now is None:
            now = time.time()
        if now >= self._next_check:
            self._maintain(now)
        if not self._ok:
            if not self._closed:
                record_write_failure(self.destination, self._error, self.path)
            return False
        try:
            n = os.write(self._fd, data)
            if n < len(data):  # only at a size limit or disk full; the rest will fail too
                os.write(self._fd, data[n:])
            return True
        except OSError as exc:
            record_write_failure(self.destination, exc, self.path)
            return False

    def close(self) -> None:
        """Close the file; later writes are dropped silently."""
        with self._lock:
            self._closed, self._ok = True, False
            for fd in (self._fd, self._lock_fd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._fd = self._lock_fd = -1

    # -- maintenance (at most once per check interval per process) -----------------------

    def _maintain(self, now: float) -> None:
        with self._lock:
            if self._closed or now < self._next_check:
                return  # closed, or another thread just did it
            try:
                if now >= self._next_rollover or not self._ok or self._path_changed():
                    self._reopen(now)
                self._next_check = min(self._next_rollover, now + self._check_interval)
            except Exception as exc:  # OSError mostly; nothing may reach the caller
                self._ok, self._error = False, exc
                self._next_check = now + self._check_interval  # retry, e.g. dir restored

    def _path_changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def _reopen(self, now: float) -> None:
        periods = self._periods
        index = periods.index(now)
        first = self._ident is None
        rotated = False
        if periods.rotating:
            lock_fd = self._acquire_flock()
            try:
                rotated = self._rotate_if_due(lock_fd, index)
                fd = os.open(self.path, _OPEN_FLAGS, self._mode)
                try:
                    st = os.fstat(fd)
                    if _read_state(lock_fd)[:2] != (st.st_dev, st.st_ino):
                        _write_state(lock_fd, st.st_dev, st.st_ino, index)
                    if rotated or first:
                        self._prune(index)
                except BaseException:
                    os.close(fd)
                    raise
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        else:
            fd = os.open(self.path, _OPEN_FLAGS, self._mode)
            st = os.fstat(fd)
        if self._fd >= 0:
            # dup2 swaps the file behind the same descriptor number atomically, so a
            # thread writing concurrently hits the old or the new file, never a stale or
            # recycled descriptor.
            os.dup2(fd, self._fd, inheritable=False)
            os.close(fd)
        else:
            self._fd = fd
        self._ident = (st.st_dev, st.st_ino)
        self._ok, self._error = True, None
        self._next_rollover = periods.start(index + 1)

    def _acquire_flock(self) -> int:
        """Return the lock descriptor, locked; one open per process and per lock file."""
        for _ in range(5):
            if self._lock_fd >= 0 and self._lock_pid != os.getpid():
                # Inherited across fork: flock is per open file description, so sharing
                # the parent's would not exclude the parent. Open our own.
                os.close(self._lock_fd)
                self._lock_fd = -1
            if self._lock_fd < 0:
                self._lock_fd = os.open(
                    self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
                self._lock_pid = os.getpid()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                here = os.stat(self._lock_path)
                mine = os.fstat(self._lock_fd)
                if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                    return self._lock_fd
            except FileNotFoundError:
                pass
            # The lock file was removed or replaced (directory recreated): a lock on the
            # old one excludes nobody.
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1
        raise OSError(f"cannot lock {self._lock_path}: it keeps being replaced")

    def _rotate_if_due(self, lock_fd: int, index: int) -> bool:
        """Under the flock: rename the live file away if it belongs to an older period."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        dev, ino, live = _read_state(lock_fd)
        if (dev, ino) != (st.st_dev, st.st_ino):
            if st.st_size == 0:
                return False
            # No record of this file (first start, or created by someone else): its
            # last write tells which period it holds.
            live = self._periods.index(st.st_mtime)
        if live >= index:
            return False
        target = f"{self.path}.{self._periods.suffix(live)}"
        n = 0
        while os.path.lexists(target if n == 0 else f"{target}.{n}"):
            n += 1
        os.rename(self.path, target if n == 0 else f"{target}.{n}")
        return True

    def _prune(self, index: int) -> None:
        if self.retention is None:
            return
        oldest = index - self.retention
        try:
            names = os.listdir(self._dir)
        except OSError:
            return
        for name in names:
            m = self._archive_re.fullmatch(name)
            if m is None:
                continue
            period = self._periods.parse(m.group(1))
            if period is not None and period < oldest:
                try:
                    os.unlink(os.path.join(self._dir, name))
                except OSError:
                    pass


def _read_state(lock_fd: int) -> tuple[int, int, int]:
    """(st_dev, st_ino, period) of the live file as the last rotator wrote them."""
    try:
        dev, ino, period = os.pread(lock_fd, 128, 0).split()[:3]
        return int(dev), int(ino), int(period)
    except (OSError, ValueError):
        return -1, -1, 0


def _write_state(lock_fd: int, dev: int, ino: int, period: int) -> None:
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{dev} {ino} {period}\n".encode(), 0)


def write_all(files: tuple[LogFile, ...], data: bytes, now: float) -> None:
    """Append *data* to each of *files*, as :meth:`LogFile.write` at time *now* does.

    One ``os.write`` per file, no clock read, no lock and no method call while no
    maintenance is due (the access-log fast path: one call for ``app.log`` and
    ``access.log``). Never raises; failures are counted.

    .. code-block:: python

        write_all((app_log, access_log), b'{"message": "hello"}\n', time.time())
    """
    for f in files:
        if now < f._next_check and f._ok:
            try:
                n = os.write(f._fd, data)
                if n < len(data):  # as in LogFile.write
                    os.write(f._fd, data[n:])
            except OSError as exc:
                record_write_failure(f.destination, exc, f.path)
        else:
            f.write(data, now)


# -- logging handlers -----------------------------------------------------------------

# Bumped whenever the level, formatter or filters of one of sfmon's handlers change, so
# the access-log sink's plan (which handlers take its ready-made line) needs no check of
# every handler before every line. Only ever increases.
handler_changes = 0


def _handler_changed() -> None:
    global handler_changes
    handler_changes += 1


class _Filters(list[Any]):
    """A handler's filter list that counts changes made in place (``append``, ``[:] =``)."""

    __slots__ = ()


def _counting(name: str) -> Any:
    method = getattr(list, name)

    def counting(self: _Filters, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            _handler_changed()

    counting.__name__ = name
    return counting


for _name in (
    *("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse"),
    *("__setitem__", "__delitem__", "__iadd__", "__imul__"),
):
    setattr(_Filters, _name, _counting(_name))


class _WatchedHandler(logging.Handler):
    """A handler whose changes of level, formatter or filters are counted.

    Any such change, through ``setLevel``/``setFormatter``/``addFilter`` or by
    assigning or editing the attributes, bumps ``handler_changes``; the access-log sink
    then works out its plan again before the next line. sfmon's handlers derive from it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "filters" and type(value) is not _Filters:
            value = _Filters(value)
        super().__setattr__(name, value)
        if name in ("level", "formatter", "filters"):
            _handler_changed()


class DailyRotatingFileHandler(_WatchedHandler):
    """A :mod:`logging` handler writing to a :class:`LogFile`: safe for many processes.

    Options are those of :class:`LogFile`. Unlike ``TimedRotatingFileHandler`` it may be
    created before ``fork`` or in every worker: no line is lost, duplicated or torn.

    .. code-block:: python

        handler = DailyRotatingFileHandler("logs/app.log", retention=30)
        handler.setFormatter(sfmon.logs.JsonFormatter())
        logging.getLogger().addHandler(handler)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        level: int = logging.NOTSET,
        **options: Any,
    ) -> None:
        super().__init__(level)
        self.file = LogFile(path, **options)
        self.destination = self.file.destination

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.file.write((line + "\n").encode("utf-8", "backslashreplace"))

    def write_json_line(self, line: str) -> None:
        """Append an already formatted line (the access-log fast path)."""
        self.file.write((line + "\n").encode("utf-8", "backslashreplace"))

    def handleError(self, record: logging.LogRecord) -> None:
        record_write_failure(self.destination, sys.exc_info()[1], self.file.path)

    def close(self) -> None:
        self.file.close()
        super().close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.file.path} ({logging.getLevelName(self.level)})>"
