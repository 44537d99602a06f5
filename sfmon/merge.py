"""Read the store's files, merge them into one snapshot, and fold dead workers away.

A scrape holds a shared ``flock`` on the store's lock file while it lists and reads
the files; folding a dead worker into the archive holds it exclusively, so a scrape
sees a worker's counts either in its own file or in the archive, never twice or not
at all. Files that fail validation are skipped (and, once their owner is gone,
renamed ``*.corrupt`` and counted), never fatal.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .store import (
    ARCHIVE_NAME,
    BLOCK_KEY,
    HEADER,
    HEADER_SIZE,
    KIND_BLOCK,
    KIND_FAMILY,
    KIND_FOLDED,
    KIND_SERIES,
    LOCK_NAME,
    MAGIC,
    NATIVE_BLOCK,
    RECORD,
    SUFFIX,
    VALUE_SCALE,
    VERSION,
    WORKER_PREFIX,
)

__all__ = ["FamilySnapshot", "HistogramValue", "Snapshot", "StoreReader"]

LIVE_MODES = frozenset(("livesum", "livemax", "livemin", "livemostrecent"))


class CorruptFile(Exception):
    """A store file that cannot be parsed."""


@contextmanager
def locked(directory: str, exclusive: bool) -> Iterator[None]:
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        # Deleted under a running service (rm -rf, a tmp cleaner): recreate, never fail.
        print(f"sfmon: store directory {directory} vanished; recreated", file=sys.stderr)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        if exclusive:
            raise
        # A read-only store: no fold can run there (it writes the archive), so a
        # reader needs no lock.
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class ParsedFile:
    """The record structure of one file; re-parsed only where it grew."""

    __slots__ = (
        "blocks",
        "corrupt_count",
        "create_time",
        "created_ns",
        "families",
        "folded",
        "folded_count",
        "parsed",
        "pid",
        "series",
    )

    def __init__(self, pid: int, create_time: float, created_ns: int) -> None:
        self.pid = pid
        self.create_time = create_time
        self.created_ns = created_ns
        self.parsed = HEADER_SIZE
        self.families: dict[str, dict[str, Any]] = {}
        # (family name, label values, first slot)
        self.series: list[tuple[str, tuple[str, ...], int]] = []
        # (index into series, sign, first bucket index, first slot)
        self.blocks: list[tuple[int, int, int, int]] = []
        self.folded: list[str] = []
        self.folded_count = 0
        self.corrupt_count = 0


def _header(buf: bytes) -> tuple[int, int, float, int, int, int]:
    if len(buf) < HEADER_SIZE:
        raise CorruptFile("shorter than the header")
    magic, version, hsize, used, pid, ctime, created_ns, folded, corrupt = HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION or hsize != HEADER_SIZE:
        raise CorruptFile("bad magic or version")
    if used < HEADER_SIZE or used % 8:
        raise CorruptFile("bad used size")
    return used, pid, ctime, created_ns, folded, corrupt


def parse_records(buf: bytes, used: int, pf: ParsedFile) -> None:
    """Parse the records of *buf* from ``pf.parsed`` up to *used* into *pf*."""
    pos = pf.parsed
    series_at = {slot: i for i, (_, _, slot) in enumerate(pf.series)}
    while pos < used:
        if pos + RECORD.size > used:
            raise CorruptFile(f"record header past the end at {pos}")
        kind, nslots, keylen, _flags = RECORD.unpack_from(buf, pos)
        key_start = pos + RECORD.size
        slot_start = key_start + ((keylen + 7) & ~7)
        end = slot_start + 8 * nslots
        if end > used:
            raise CorruptFile(f"record past the end at {pos}")
        key = buf[key_start : key_start + keylen]
        try:
            if kind == KIND_FAMILY:
                meta = json.loads(key)
                pf.families[meta["name"]] = meta
            elif kind == KIND_SERIES:
                name, values = json.loads(key)
                meta = pf.families[name]
                if len(values) != len(meta["labels"]) or nslots != _nslots(meta):
                    raise CorruptFile(f"series {name} does not match its family")
                series_at[slot_start // 8] = len(pf.series)
                pf.series.append((name, tuple(values), slot_start // 8))
            elif kind == KIND_BLOCK:
                sslot, sign, first = BLOCK_KEY.unpack(key)
                if nslots != NATIVE_BLOCK or sign not in (1, -1):
                    raise CorruptFile("bad native block")
                pf.blocks.append((series_at[sslot], sign, first, slot_start // 8))
            elif kind == KIND_FOLDED:
                pf.folded = [str(x) for x in json.loads(key)]
            else:
                raise CorruptFile(f"unknown record kind {kind}")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise CorruptFile(f"bad record at {pos}: {exc!r}") from None
        pos = end
    pf.parsed = pos


def _nslots(meta: dict[str, Any]) -> int:
    kind = meta["type"]
    if kind == "counter":
        return 1
    if kind == "gauge":
        return 2
    if kind == "histogram":
        return 3 + len(meta["buckets"])
    raise CorruptFile(f"unknown type {kind!r}")


class FamilySnapshot:
    """One merged family: its metadata and its series' merged values.

    ``series`` maps label values to: a float (counter), ``(value, time)`` (gauge), or
    a ``HistogramValue`` (histogram).
    """

    __slots__ = ("meta", "series")

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.series: dict[tuple[str, ...], Any] = {}


class HistogramValue:
    """Merged histogram series: sum, classic bucket counts, native buckets."""

    __slots__ = ("bounds", "buckets", "native", "schema", "sum_q", "zero_count", "zero_threshold")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # finite bounds; buckets has one more entry (+Inf)
        self.buckets = [0] * (len(bounds) + 1)
        self.sum_q = 0
        self.zero_count = 0
        self.schema: int | None = None
        self.zero_threshold = 0.0
        self.native: dict[int, int] = {}  # signed key: index * sign, stored as (sign, idx)

    @property
    def count(self) -> int:
        return sum(self.buckets)

    @property
    def sum(self) -> float:
        return self.sum_q / VALUE_SCALE

    def cumulative(self) -> list[tuple[float, int]]:
        out, acc = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.buckets):
            acc += n
            out.append((bound, acc))
        return out


class Snapshot:
    """The store merged across files at one moment."""

    def __init__(self) -> None:
        self.families: dict[str, FamilySnapshot] = {}
        self.files_read = 0
        self.files_skipped: list[str] = []
        self.corrupt_total = 0
        self.folded_total = 0
        self.dead: list[str] = []
        # live worker files: (pid, {family: total over its series}) — counters in
        # values (not 1/65536 units), gauges summed
        self.workers: list[tuple[int, dict[str, float]]] = []


def _alive(pid: int, create_time: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time == 0.0 or abs(proc.create_time() - create_time) < 0.01
    except psutil.NoSuchProcess:
        return False
    except Exception:
        return True


class StoreReader:
    """Reads and merges a store directory; keeps parsed structure between scrapes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._parsed: dict[str, ParsedFile] = {}

    def _load(self, name: str) -> tuple[ParsedFile, memoryview]:
        with open(os.path.join(self.directory, name), "rb") as f:
            head = f.read(HEADER_SIZE)
            used, pid, ctime, created_ns, folded, corrupt = _header(head)
            rest = f.read(used - HEADER_SIZE)
        buf = head + rest
        if len(buf) != used:
            raise CorruptFile("truncated")
        pf = self._parsed.get(name)
        if pf is None or pf.created_ns != created_ns or pf.pid != pid or pf.parsed > used:
            pf = ParsedFile(pid, ctime, created_ns)
        pf.folded_count, pf.corrupt_count = folded, corrupt
        if pf.parsed < used:
            try:
                parse_records(buf, used, pf)
            except CorruptFile:
                self._parsed.pop(name, None)
                raise
        self._parsed[name] = pf
        return pf, memoryview(buf)

    def snapshot(self, *, live_check: bool = True) -> Snapshot:
        """Merge every file: the archive first, then workers in name order."""
        snap = Snapshot()
        with locked(self.directory, exclusive=False):
            names = sorted(
                n
                for n in os.listdir(self.directory)
                if n.endswith(SUFFIX) and (n == ARCHIVE_NAME or n.startswith(WORKER_PREFIX))
            )
            if ARCHIVE_NAME in names:
                names.remove(ARCHIVE_NAME)
                names.insert(0, ARCHIVE_NAME)
            folded: set[str] = set()
            seen = set()
            for name in names:
                if name in folded:
                    continue  # already inside the archive (fold interrupted)
                try:
                    pf, buf = self._load(name)
                except FileNotFoundError:
                    continue
                except (CorruptFile, OSError, ValueError) as exc:
                    snap.files_skipped.append(name)
                    _warn_once(name, exc)
                    continue
                seen.add(name)
                snap.files_read += 1
                is_archive = name == ARCHIVE_NAME
                if is_archive:
                    folded.update(pf.folded)
                    snap.corrupt_total += pf.corrupt_count
                    snap.folded_total += pf.folded_count
                    live = False
                else:
                    live = not live_check or _alive(pf.pid, pf.create_time)
                    if not live:
                        snap.dead.append(name)
                    else:
                        snap.workers.append((pf.pid, _totals(pf, buf)))
                _merge_file(snap, pf, buf, include_live=live or is_archive)
        for stale in set(self._parsed) - seen:
            del self._parsed[stale]
        return snap


def _totals(pf: ParsedFile, buf: memoryview) -> dict[str, float]:
    q = buf.cast("q")
    d = buf.cast("d")
    out: dict[str, float] = {}
    for name, _values, slot in pf.series:
        kind = pf.families[name]["type"]
        if kind == "counter":
            out[name] = out.get(name, 0.0) + q[slot] / VALUE_SCALE
        elif kind == "gauge":
            out[name] = out.get(name, 0.0) + d[slot]
    return out


_warned: set[str] = set()


def _warn_once(name: str, exc: BaseException) -> None:
    if name not in _warned:
        _warned.add(name)
        print(f"sfmon: skipping unreadable store file {name}: {exc}", file=sys.stderr)


def _merge_file(snap: Snapshot, pf: ParsedFile, buf: memoryview, *, include_live: bool) -> None:
    q = buf.cast("q")
    d = buf.cast("d")
    families = snap.families
    hist_of: dict[int, HistogramValue] = {}
    for i, (name, values, slot) in enumerate(pf.series):
        meta = pf.families[name]
        fam = families.get(name)
        if fam is None:
            fam = families[name] = FamilySnapshot(meta)
        kind = meta["type"]
        series = fam.series
        if kind == "counter":
            series[values] = series.get(values, 0) + q[slot]
        elif kind == "gauge":
            mode = meta.get("mode", "livesum")
            if mode in LIVE_MODES and not include_live:
                continue
            value, stamp = d[slot], d[slot + 1]
            old = series.get(values)
            if old is None:
                series[values] = (value, stamp)
            elif mode.endswith("sum"):
                series[values] = (old[0] + value, max(old[1], stamp))
            elif mode.endswith("max"):
                series[values] = (max(old[0], value), max(old[1], stamp))
            elif mode.endswith("min"):
                series[values] = (min(old[0], value), max(old[1], stamp))
            elif stamp >= old[1]:
                series[values] = (value, stamp)
        else:
            bounds = tuple(meta["buckets"])
            hv = series.get(values)
            if hv is None:
                hv = series[values] = HistogramValue(bounds)
            hv.sum_q += q[slot]
            counts = q[slot + 2 : slot + 3 + len(bounds)].tolist()
            if hv.bounds == bounds:
                hv.buckets = [a + b for a, b in zip(hv.buckets, counts)]
            else:
                _merge_other_bounds(hv, bounds, counts)
            native = meta.get("native")
            if native:
                hv.zero_count += q[slot + 1]
                hist_of[i] = hv
                _note_schema(hv, native)
    for series_i, sign, first, slot in pf.blocks:
        hv = hist_of.get(series_i)
        if hv is None:
            continue
        schema = pf.families[pf.series[series_i][0]]["native"]["schema"]
        counts = q[slot : slot + NATIVE_BLOCK].tolist()
        for j, n in enumerate(counts):
            if n:
                idx = first + j
                if schema != hv.schema:
                    from .native import reduce_index

                    assert hv.schema is not None
                    idx = reduce_index(idx, schema - hv.schema)
                key = idx * 2 if sign > 0 else idx * 2 + 1
                hv.native[key] = hv.native.get(key, 0) + n


def _note_schema(hv: HistogramValue, native: dict[str, Any]) -> None:
    schema = int(native["schema"])
    if hv.schema is None:
        hv.schema = schema
        hv.zero_threshold = float(native["zero_threshold"])
    elif schema < hv.schema:
        from .native import reduce_index

        steps = hv.schema - schema
        merged: dict[int, int] = {}
        for key, n in hv.native.items():
            idx = reduce_index(key >> 1, steps)
            k = idx * 2 + (key & 1)
            merged[k] = merged.get(k, 0) + n
        hv.native = merged
        hv.schema = schema


def _merge_other_bounds(hv: HistogramValue, bounds: tuple[float, ...], counts: list[int]) -> None:
    # Bucket layouts differ (a deploy changed them): merge by bound, keep the union.
    table: dict[float, int] = {}
    for bound, n in zip((*hv.bounds, math.inf), hv.buckets):
        table[bound] = table.get(bound, 0) + n
    for bound, n in zip((*bounds, math.inf), counts):
        table[bound] = table.get(bound, 0) + n
    keys = sorted(table)
    hv.bounds = tuple(k for k in keys if k != math.inf)
    hv.buckets = [table[k] for k in keys]
