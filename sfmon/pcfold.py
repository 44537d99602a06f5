"""Fold a dead worker's prometheus_client ``*.db`` files into per-type archives.

prometheus_client keeps every dead worker's counter, histogram and summary files, so
its scrape slows down with every recycled worker. sfmon's ``child_exit`` folds them
into ``<type>_archive.db`` (read and written with prometheus_client's own file format)
under the store's exclusive lock; sfmon's scrape reads prometheus_client's files under
the shared lock, so it never sees a worker's values twice or not at all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from .merge import locked

__all__ = ["LockedCollector", "fold_prometheus_client_files"]


def _combine(
    mode: str, old: tuple[float, float] | None, new: tuple[float, float]
) -> tuple[float, float]:
    if old is None:
        return new
    if mode == "max":
        return (max(old[0], new[0]), max(old[1], new[1]))
    if mode == "min":
        return (min(old[0], new[0]), max(old[1], new[1]))
    if mode == "mostrecent":
        return new if new[1] >= old[1] else old
    return (old[0] + new[0], max(old[1], new[1]))  # counters, histograms, summaries, sum


def fold_prometheus_client_files(mp_dir: str, pid: int, lock_dir: str) -> int:
    """Fold *pid*'s files in *mp_dir* into archives; return how many were folded.

    ``live*`` gauges are left to ``mark_process_dead`` and ``all`` gauges (one series
    per pid, by design) are kept as they are.
    """
    from prometheus_client.mmap_dict import MmapedDict

    suffix = f"_{pid}.db"
    folded = 0
    with locked(lock_dir, exclusive=True):
        for name in sorted(os.listdir(mp_dir)):
            if not name.endswith(suffix):
                continue
            parts = name[: -len(".db")].split("_")
            kind = parts[0]
            if kind == "gauge":
                mode = parts[1] if len(parts) > 2 else "all"
                if mode.startswith("live") or mode == "all":
                    continue
                archive = f"gauge_{mode}_archive.db"
            elif kind in ("counter", "histogram", "summary"):
                mode, archive = "sum", f"{kind}_archive.db"
            else:
                continue
            dead = os.path.join(mp_dir, name)
            target = os.path.join(mp_dir, archive)
            values: dict[str, tuple[float, float]] = {}
            sources = [target, dead] if os.path.exists(target) else [dead]
            try:
                for source in sources:
                    for key, value, stamp, _pos in MmapedDict.read_all_values_from_file(source):  # type: ignore[no-untyped-call]
                        values[key] = _combine(mode, values.get(key), (value, stamp))
            except (OSError, ValueError, UnicodeDecodeError):
                continue  # unreadable: leave it for prometheus_client to report
            fd, tmp = tempfile.mkstemp(prefix=".tmp-pc-", dir=mp_dir)
            os.close(fd)
            os.unlink(tmp)  # MmapedDict creates (and sizes) the file itself
            out = MmapedDict(tmp)  # type: ignore[no-untyped-call]
            try:
                for key in sorted(values):
                    out.write_value(key, *values[key])  # type: ignore[no-untyped-call]
            finally:
                out.close()  # type: ignore[no-untyped-call]
            os.replace(tmp, target)
            os.unlink(dead)
            folded += 1
    return folded


class LockedCollector(Collector):
    """Collects another collector while holding the store's shared lock."""

    def __init__(self, collector: Collector, lock_dir: str) -> None:
        self.collector = collector
        self.lock_dir = lock_dir

    def collect(self) -> Iterable[Metric]:
        with locked(self.lock_dir, exclusive=False):
            return list(self.collector.collect())
