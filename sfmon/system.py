"""System figures for the whole service: the gunicorn master and its live workers.

CPU percent needs two samples: each call compares with the previous sample, shared
through a small file in the store directory (so it does not matter which worker
answers), and takes a short fresh interval when there is no usable previous sample.
Worker slots give per-worker metrics a bounded label: each worker holds an ``flock``
on the lowest free ``slot-<n>`` file for its lifetime.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import Any

import psutil

from . import store

__all__ = ["ProcessFigures", "claim_slot", "disk_free_ratio", "service_processes", "snapshot"]

SAMPLE_FILE = "cpu-sample.json"
MIN_INTERVAL = 0.25
MAX_AGE = 60.0
FRESH_INTERVAL = 0.2
_slots: dict[tuple[int, str], int] = {}  # (pid, directory) -> slot


def claim_slot(directory: str) -> int:
    """Return this process's worker slot (0, 1, ...), claiming one on first call."""
    pid = os.getpid()
    known = _slots.get((pid, directory))
    if known is not None:
        return known
    n = 0
    while True:
        fd = os.open(os.path.join(directory, f"slot-{n}"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            n += 1
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(pid).encode())
        _slots[(pid, directory)] = n  # the fd stays open: the lock lives as long as we do
        return n


def slot_of(directory: str, pid: int) -> int | None:
    """The slot held by *pid* (from the slot files), or ``None``."""
    for name in os.listdir(directory):
        if name.startswith("slot-"):
            try:
                with open(os.path.join(directory, name)) as f:
                    if f.read().strip() == str(pid):
                        return int(name[5:])
            except (OSError, ValueError):
                continue
    return None


def service_processes() -> list[psutil.Process]:
    """The master (from the service facts) and its live children; else this process."""
    meta = store.read_service_meta(store.store_directory())
    try:
        master = psutil.Process(int(meta.get("master_pid", os.getpid())))
        procs = [master, *master.children(recursive=True)]
    except (psutil.Error, ValueError):
        procs = [psutil.Process()]
    return [p for p in procs if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class ProcessFigures:
    """RSS, VMS, memory percent and CPU percent of one process."""

    __slots__ = ("cpu_percent", "memory_percent", "pid", "rss", "vms")

    def __init__(
        self, pid: int, rss: int, vms: int, memory_percent: float, cpu_percent: float
    ) -> None:
        self.pid = pid
        self.rss = rss
        self.vms = vms
        self.memory_percent = memory_percent
        self.cpu_percent = cpu_percent


def _cpu_times(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def _read_sample(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_sample(path: str, data: dict[str, Any]) -> None:
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-cpu-", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass


def snapshot() -> tuple[list[ProcessFigures], float]:
    """Per-process figures of the service, and the service's CPU percent of the machine.

    CPU percent is of the whole machine (100 = every core busy), measured since the
    previous call by any worker, or over a fresh short interval.
    """
    procs = service_processes()
    path = os.path.join(store.store_directory(), SAMPLE_FILE)
    now = time.monotonic()
    wall = time.time()
    previous = _read_sample(path)
    age = None if previous is None else wall - float(previous.get("wall", 0))
    cached: dict[int, float] | None = None
    if previous is not None and age is not None and 0 <= age < MIN_INTERVAL:
        # Too soon for a meaningful delta: reuse the percentages of the last sample.
        cached = {int(k): float(v) for k, v in previous.get("percents", {}).items()}
    else:
        times = _cpu_times(procs)
        if previous is None or age is None or age > MAX_AGE:
            time.sleep(FRESH_INTERVAL)
            before, times = times, _cpu_times(procs)
            elapsed = time.monotonic() - now
            wall = time.time()
        else:
            before = {int(k): float(v) for k, v in previous.get("times", {}).items()}
            elapsed = age
    ncpu = psutil.cpu_count() or 1
    figures = []
    percents: dict[int, float] = {}
    for p in procs:
        try:
            mem = p.memory_info()
            mem_pct = p.memory_percent()
        except psutil.Error:
            continue
        if cached is not None:
            pct = cached.get(p.pid, 0.0)
        else:
            used = times.get(p.pid, 0.0) - before.get(p.pid, times.get(p.pid, 0.0))
            pct = max(0.0, used / elapsed * 100.0) if elapsed > 0 else 0.0
        percents[p.pid] = pct
        figures.append(ProcessFigures(p.pid, mem.rss, mem.vms, mem_pct, pct))
    if cached is None:
        _write_sample(path, {"wall": wall, "times": times, "percents": percents})
    return figures, sum(percents.values()) / ncpu


def disk_free_ratio(path: str) -> float:
    """Free fraction (0..1) of the filesystem holding *path* (its nearest existing parent)."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    usage = shutil.disk_usage(path or ".")
    return usage.free / usage.total if usage.total else 0.0
