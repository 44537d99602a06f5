"""The multiprocess store: one fixed-slot file per worker process, merged at scrape.

Each process appends records to its own memory-mapped file and then only adds into
8-byte slots it owns, so writers never lock against each other and readers never see
a torn value. Counts are integers (counter values and histogram sums in 1/65536
units), so merging in any order gives bit-identical totals. Dead workers' files are
folded into one archive (see :mod:`sfmon.merge`), which keeps the number of files,
and the scrape cost, bounded by the live workers.

File layout (little-endian, every offset a multiple of 8)::

    header (64 bytes): magic, version, header size, used bytes, pid, process
                       create time, file creation time (ns), folded count, corrupt count
    records:           u32 kind, u32 slots, u32 key length, u32 flags,
                       key (padded to 8), slots (8 bytes each)

Record kinds: a family (key: JSON metadata, no slots), a series (key: JSON
``[name, [label values]]``), a native-bucket block (key: series slot, sign, first
index; ``NATIVE_BLOCK`` slots) and, in the archive only, the list of folded files.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "HEADER",
    "KIND_BLOCK",
    "KIND_FAMILY",
    "KIND_FOLDED",
    "KIND_SERIES",
    "MAGIC",
    "NATIVE_BLOCK",
    "RECORD",
    "VALUE_SCALE",
    "Writer",
    "configure_directory",
    "get_writer",
    "store_directory",
]

MAGIC = b"SFMONST1"
VERSION = 1
HEADER = struct.Struct("<8sIIQqdqqq")
HEADER_SIZE = 64
RECORD = struct.Struct("<IIII")
BLOCK_KEY = struct.Struct("<qii")
KIND_FAMILY = 1
KIND_SERIES = 2
KIND_BLOCK = 3
KIND_FOLDED = 4
# Native buckets are allocated 16 at a time: few records, no per-bucket key.
NATIVE_BLOCK = 16
# Counter values and histogram sums are stored as integers in units of 1/65536: integer
# addition is associative, so folding files into the archive never moves a total.
VALUE_SCALE = 65536
WORKER_PREFIX = "w-"
SUFFIX = ".sfm"
ARCHIVE_NAME = "archive" + SUFFIX
LOCK_NAME = "lock"
META_NAME = "service.json"
INITIAL_SIZE = 1 << 16
# Seconds between checks that a writer's file is still linked (see Writer.check).
CHECK_INTERVAL = 1.0
assert HEADER.size <= HEADER_SIZE

_USED_SLOT = 2  # header word holding the used-bytes count (byte offset 16)

_configured_dir: str | None = None
_private_dir: str | None = None
_writer: Writer | None = None
_writer_lock = threading.Lock()


def configure_directory(path: str | os.PathLike[str] | None) -> None:
    """Point this process's store at *path* (``None``: back to the environment).

    The directory holds sfmon's files; it must be shared by every worker of one
    service and by no other service. Must be called before the first write.
    """
    global _configured_dir
    _configured_dir = None if path is None else os.fspath(path)


def store_directory() -> str:
    """Return (and create) the directory of this process's store.

    In order: the directory given to :func:`configure_directory`, else
    ``$PROMETHEUS_MULTIPROC_DIR/sfmon``, else a private temporary directory for a
    single-process server.
    """
    global _private_dir
    if _configured_dir is not None:
        path = _configured_dir
    elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "sfmon")
    else:
        if _private_dir is None:
            _private_dir = tempfile.mkdtemp(prefix="sfmon-")
        path = _private_dir
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def process_create_time(pid: int) -> float:
    """The kernel's start time of *pid* (seconds), used to tell PID reuse apart."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except Exception:
        return 0.0


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class Writer:
    """This process's file in the store: allocates series and owns their slots.

    Values are updated directly through :attr:`q` (int64 view) and :attr:`d`
    (float64 view) while holding :attr:`lock`; a gthread worker's threads share one
    writer and the lock keeps read-add-store sequences whole.
    """

    def __init__(self, directory: str, *, name: str | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.series: dict[tuple[str, tuple[str, ...]], int] = {}
        self.blocks: dict[tuple[int, int, int], int] = {}
        self.family_series: dict[str, int] = {}
        self._families: set[str] = set()
        created_ns = time.time_ns()
        if name is None:
            name = f"{WORKER_PREFIX}{self.pid}-{created_ns}-{os.urandom(3).hex()}{SUFFIX}"
        self.name = name
        self.path = os.path.join(directory, name)
        header = HEADER.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            HEADER_SIZE,
            self.pid,
            process_create_time(self.pid),
            created_ns,
            0,
            0,
        ).ljust(HEADER_SIZE, b"\0")
        # Build the header under a temporary name and rename: readers never see an
        # empty or half-written file (prometheus_client #1199).
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            os.write(fd, header)
            os.ftruncate(fd, INITIAL_SIZE)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._fd = fd
        self._size = INITIAL_SIZE
        self._mm = mmap.mmap(fd, INITIAL_SIZE)
        self.q = memoryview(self._mm).cast("q")
        self.d = memoryview(self._mm).cast("d")
        self.used = HEADER_SIZE
        self.check_at = time.perf_counter() + CHECK_INTERVAL
        self.check_failed = False

    def check(self, now: float) -> None:
        """Put this file back if it was deleted (``rm -rf``, a tmp cleaner); never raises.

        The mapping still holds every count of this process, so they are written to a
        new file under the same name. Cheap: one ``fstat`` per ``CHECK_INTERVAL``
        (*now* is ``time.perf_counter()``).
        """
        self.check_at = now + CHECK_INTERVAL
        try:
            if os.fstat(self._fd).st_nlink:
                return
            with self.lock:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
                try:
                    with open(fd, "wb", closefd=False) as f:
                        f.write(self._mm[: self.used])
                    os.ftruncate(fd, self._size)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.close(fd)
                    os.unlink(tmp)
                    raise
                self.q.release()
                self.d.release()
                self._mm.close()
                os.close(self._fd)
                self._fd = fd
                self._mm = mmap.mmap(fd, self._size)
                self.q = memoryview(self._mm).cast("q")
                self.d = memoryview(self._mm).cast("d")
        except Exception as exc:
            if not self.check_failed:
                self.check_failed = True
                print(f"sfmon: cannot recreate deleted {self.path}: {exc!r}", file=sys.stderr)
            return
        print(f"sfmon: store file {self.path} was deleted; recreated", file=sys.stderr)
        from .metrics import counter

        counter(
            "sfmon_store_files_recreated_total",
            "Store files recreated after being deleted under a running worker.",
        ).inc()

    # -- allocation (callers hold self.lock) ------------------------------------

    def _grow(self, needed: int) -> None:
        size = self._size
        while size < needed:
            size *= 2
        os.ftruncate(self._fd, size)
        self.q.release()
        self.d.release()
        self._mm.close()
        self._mm = mmap.mmap(self._fd, size)
        self._size = size
        self.q = memoryview(self._mm).cast("q")
        self.d = memoryview(self._mm).cast("d")

    def append(self, kind: int, key: bytes, nslots: int) -> int:
        """Append a record; return the index (in 8-byte slots) of its first slot."""
        start = self.used
        key_end = start + RECORD.size + _pad8(len(key))
        end = key_end + 8 * nslots
        if end > self._size:
            self._grow(end)
        mm = self._mm
        RECORD.pack_into(mm, start, kind, nslots, len(key), 0)
        mm[start + RECORD.size : start + RECORD.size + len(key)] = key
        # Slots are zero already (fresh file area). Publish only after the record is
        # complete, so a concurrent reader stops before a half-written record.
        self.used = end
        self.q[_USED_SLOT] = end
        return key_end // 8

    def _ensure_family(self, family: Any) -> None:
        if family.name not in self._families:
            self.append(KIND_FAMILY, json.dumps(family.meta(), sort_keys=True).encode(), 0)
            self._families.add(family.name)

    def series_slot(self, family: Any, labels: tuple[str, ...]) -> int:
        """Return the first slot of *family*'s series *labels*, allocating it once.

        Past ``family.max_series`` distinct label sets in this process, new ones share
        one series whose label values are all ``__overflow__``.
        """
        key = (family.name, labels)
        slot = self.series.get(key)
        if slot is not None:
            return slot
        overflowed = False
        with self.lock:
            slot = self.series.get(key)
            if slot is not None:
                return slot
            if self.family_series.get(family.name, 0) >= family.max_series:
                overflowed = True
                store_key = (family.name, (OVERFLOW,) * len(labels))
                slot = self.series.get(store_key)
            else:
                store_key = key
            if slot is None:
                self._ensure_family(family)
                body = json.dumps([family.name, list(store_key[1])]).encode()
                slot = self.append(KIND_SERIES, body, family.nslots)
                self.series[store_key] = slot
                self.family_series[family.name] = self.family_series.get(family.name, 0) + 1
            if not overflowed:
                self.series[key] = slot
        if overflowed:
            _note_overflow(family.name)
        return slot

    def block_slot(self, series_slot: int, sign: int, block: int) -> int:
        """Return the first slot of the native-bucket block *block* of a series."""
        key = (series_slot, sign, block)
        with self.lock:
            slot = self.blocks.get(key)
            if slot is None:
                body = BLOCK_KEY.pack(series_slot, sign, block * NATIVE_BLOCK)
                slot = self.append(KIND_BLOCK, body, NATIVE_BLOCK)
                self.blocks[key] = slot
        return slot

    def close(self) -> None:
        """Unmap and close the file (it stays on disk for the archive)."""
        try:
            self.q.release()
            self.d.release()
            self._mm.close()
            os.close(self._fd)
        except (OSError, BufferError, ValueError):
            pass


OVERFLOW = "__overflow__"


def _note_overflow(name: str) -> None:
    from .metrics import label_overflow

    if name != label_overflow.name:
        label_overflow.labels(name).inc()


def get_writer() -> Writer:
    """Return this process's writer, creating its file on first use."""
    w = _writer
    if w is not None and w.pid == os.getpid():
        return w
    return _new_writer()


def _new_writer() -> Writer:
    global _writer
    with _writer_lock:
        w = _writer
        if w is None or w.pid != os.getpid():
            w = Writer(store_directory())
            _writer = w
        return w


def _after_fork_in_child() -> None:
    # The child must never write into the parent's file; it gets its own on first use.
    global _writer, _writer_lock
    _writer = None
    _writer_lock = threading.Lock()


def reset_for_tests(directory: str | None = None) -> None:
    """Forget this process's writer (and optionally switch directories). Tests only."""
    global _writer
    if _writer is not None:
        _writer.close()
    _writer = None
    configure_directory(directory)


os.register_at_fork(after_in_child=_after_fork_in_child)


def write_service_meta(directory: str, **fields: Any) -> None:
    """Write the service-wide facts (start time, master pid) next to the store."""
    data = {"start_time": time.time(), "master_pid": os.getpid(), **fields}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(directory, META_NAME))


def read_service_meta(directory: str) -> dict[str, Any]:
    """Return the service facts, creating them (now, this process) when absent."""
    path = os.path.join(directory, META_NAME)
    for _ in range(2):
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        write_service_meta(directory)
    return {"start_time": time.time(), "master_pid": os.getpid()}


def labels_tuple(values: Sequence[object]) -> tuple[str, ...]:
    """Label values as the tuple of strings the store keys on."""
    return tuple(v if type(v) is str else str(v) for v in values)
