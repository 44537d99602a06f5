"""Fold dead workers' files into the store's archive, under the exclusive lock.

gunicorn's ``child_exit`` folds the worker that just exited; a scrape folds files whose
process vanished without it (SIGKILL, OOM, PID reuse). The new archive is written
aside and renamed, and remembers the files it folded, so an interrupted fold never
counts a file twice.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time

from .merge import (
    CorruptFile,
    FamilySnapshot,
    HistogramValue,
    ParsedFile,
    Snapshot,
    StoreReader,
    _alive,
    _merge_file,
    _merge_other_bounds,
    _note_schema,
    _warn_once,
    locked,
)
from .store import (
    ARCHIVE_NAME,
    BLOCK_KEY,
    HEADER,
    HEADER_SIZE,
    KIND_BLOCK,
    KIND_FAMILY,
    KIND_FOLDED,
    KIND_SERIES,
    MAGIC,
    NATIVE_BLOCK,
    RECORD,
    SUFFIX,
    VERSION,
    WORKER_PREFIX,
)

__all__ = ["fold_dead_workers", "pid_exists"]

# The archive remembers the last folded files, so a fold interrupted between writing
# the archive and unlinking a file never counts that file twice.
FOLDED_MEMORY = 256


def fold_dead_workers(directory: str, only: list[str] | None = None) -> int:
    """Fold dead workers' files into the archive; return how many were folded.

    *only* limits the candidates to these file names (gunicorn's ``child_exit`` knows
    the pid); otherwise every worker file whose process is gone is folded. Unreadable
    files of dead workers are renamed ``*.corrupt`` and counted.
    """
    with locked(directory, exclusive=True):
        reader = StoreReader(directory)
        names = sorted(
            n for n in os.listdir(directory) if n.startswith(WORKER_PREFIX) and n.endswith(SUFFIX)
        )
        if only is not None:
            names = [n for n in names if n in only]
        archive_pf: ParsedFile | None = None
        archive_buf: memoryview | None = None
        if os.path.exists(os.path.join(directory, ARCHIVE_NAME)):
            try:
                archive_pf, archive_buf = reader._load(ARCHIVE_NAME)
            except (CorruptFile, OSError, ValueError) as exc:
                _warn_once(ARCHIVE_NAME, exc)
                os.replace(
                    os.path.join(directory, ARCHIVE_NAME),
                    os.path.join(directory, f"archive-{time.time_ns()}.corrupt"),
                )
        already = set(archive_pf.folded) if archive_pf else set()
        dead: list[tuple[str, ParsedFile | None, memoryview | None]] = []
        for name in names:
            if name in already:
                dead.append((name, None, None))
                continue
            try:
                pf, buf = reader._load(name)
            except FileNotFoundError:
                continue
            except (CorruptFile, OSError, ValueError):
                pid = _pid_from_name(name)
                if only is not None or pid is None or not pid_exists(pid):
                    dead.append((name, None, None))  # corrupt and ownerless
                continue
            if only is None and _alive(pf.pid, pf.create_time):
                continue
            dead.append((name, pf, buf))
        if not dead:
            return 0
        snap = Snapshot()
        corrupt = archive_pf.corrupt_count if archive_pf else 0
        folded_count = archive_pf.folded_count if archive_pf else 0
        if archive_pf is not None and archive_buf is not None:
            _merge_file(snap, archive_pf, archive_buf, include_live=False)
        fresh: list[str] = []
        quarantined: list[str] = []
        for name, dpf, dbuf in dead:
            if dpf is None or dbuf is None:
                if name not in already:
                    quarantined.append(name)
                continue
            _merge_file(snap, dpf, dbuf, include_live=False)
            fresh.append(name)
        folded_names = ([*(archive_pf.folded if archive_pf else []), *fresh])[-FOLDED_MEMORY:]
        _write_archive(
            directory, snap, folded_names, folded_count + len(fresh), corrupt + len(quarantined)
        )
        for name in quarantined:
            try:
                os.replace(
                    os.path.join(directory, name),
                    os.path.join(directory, name[: -len(SUFFIX)] + ".corrupt"),
                )
            except OSError:
                pass
        for name, dpf, _ in dead:
            if dpf is not None or name in already:
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    pass
        return len(fresh)


def _pid_from_name(name: str) -> int | None:
    try:
        return int(name[len(WORKER_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_archive(
    directory: str, snap: Snapshot, folded: list[str], folded_count: int, corrupt: int
) -> None:
    """Write *snap* as the new archive (temp file, then atomic rename)."""
    out = bytearray(HEADER_SIZE)
    HEADER.pack_into(
        out, 0, MAGIC, VERSION, HEADER_SIZE, 0, 0, 0.0, time.time_ns(), folded_count, corrupt
    )

    def record(kind: int, key: bytes, slots: bytes = b"") -> int:
        start = len(out)
        out.extend(RECORD.pack(kind, len(slots) // 8, len(key), 0))
        out.extend(key.ljust((len(key) + 7) & ~7, b"\0"))
        slot = len(out) // 8
        out.extend(slots)
        del start
        return slot

    record(KIND_FOLDED, json.dumps(folded).encode())
    for name in sorted(snap.families):
        fam = snap.families[name]
        meta = dict(fam.meta)
        kind = meta["type"]
        if kind == "histogram":
            bounds = _union_bounds(fam)
            meta["buckets"] = list(bounds)
            schema = _common_schema(fam)
            if schema is not None:
                meta["native"] = {**meta.get("native", {}), "schema": schema}
        if not fam.series:
            continue
        record(KIND_FAMILY, json.dumps(meta, sort_keys=True).encode())
        for values in sorted(fam.series):
            value = fam.series[values]
            key = json.dumps([name, list(values)]).encode()
            if kind == "counter":
                record(KIND_SERIES, key, struct.pack("<q", value))
            elif kind == "gauge":
                record(KIND_SERIES, key, struct.pack("<dd", *value))
            else:
                hv: HistogramValue = value
                if hv.bounds != bounds:
                    _merge_other_bounds(hv, bounds, [0] * (len(bounds) + 1))
                slots = struct.pack(f"<qq{len(hv.buckets)}q", hv.sum_q, hv.zero_count, *hv.buckets)
                sslot = record(KIND_SERIES, key, slots)
                by_block: dict[tuple[int, int], list[int]] = {}
                for k, n in hv.native.items():
                    idx, sign = k >> 1, (-1 if k & 1 else 1)
                    first = (idx // NATIVE_BLOCK) * NATIVE_BLOCK
                    block = by_block.setdefault((sign, first), [0] * NATIVE_BLOCK)
                    block[idx - first] += n
                for (sign, first), counts in sorted(by_block.items()):
                    record(
                        KIND_BLOCK,
                        BLOCK_KEY.pack(sslot, sign, first),
                        struct.pack(f"<{NATIVE_BLOCK}q", *counts),
                    )
    struct.pack_into("<Q", out, 16, len(out))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-archive-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out)
        os.replace(tmp, os.path.join(directory, ARCHIVE_NAME))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _common_schema(fam: FamilySnapshot) -> int | None:
    # One family has one schema in the archive: reduce every series to the lowest.
    schemas: list[int] = [hv.schema for hv in fam.series.values() if hv.schema is not None]
    if not schemas:
        return None
    low = min(schemas)
    for hv in fam.series.values():
        if hv.schema is not None and hv.schema != low:
            _note_schema(hv, {"schema": low, "zero_threshold": hv.zero_threshold})
    return low


def _union_bounds(fam: FamilySnapshot) -> tuple[float, ...]:
    bounds: set[float] = set()
    for hv in fam.series.values():
        bounds.update(hv.bounds)
    return tuple(sorted(bounds)) or tuple(fam.meta["buckets"])
