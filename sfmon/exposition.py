"""Turn the merged store into Prometheus expositions: text 0.0.4, OpenMetrics, protobuf.

:class:`StoreCollector` is a prometheus_client collector over sfmon's store, so the
store can be served by any prometheus_client registry; :func:`render` negotiates the
format from ``Accept`` (protobuf only when asked for) and gzips when allowed.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .compact import fold_dead_workers
from .merge import Snapshot, StoreReader
from .store import VALUE_SCALE

__all__ = ["StoreCollector", "build_registry", "render"]

ExtraCollector = Callable[[], Iterable[Metric]]


class StoreCollector(Collector):
    """A prometheus_client collector that merges sfmon's store at every collect.

    :param directory: the store directory (``sfmon.store.store_directory()``).
    :param extra: callables returning more families computed at scrape time.
    :param sweep: fold files of workers that died without ``child_exit`` (SIGKILL,
        OOM, no gunicorn hooks) into the archive after the scrape.

    .. code-block:: python

        registry = CollectorRegistry()
        registry.register(StoreCollector(store_directory()))
    """

    def __init__(
        self, directory: str, extra: Iterable[ExtraCollector] = (), *, sweep: bool = True
    ) -> None:
        self.directory = directory
        self.extra = list(extra)
        self.sweep = sweep
        self._reader = StoreReader(directory)
        self.last_snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        snap = self._reader.snapshot()
        if self.sweep and (snap.dead or snap.files_skipped):
            try:
                fold_dead_workers(self.directory)
            except OSError:
                pass
        self.last_snapshot = snap
        return snap

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        snap = self.snapshot()
        yield from families_from_snapshot(snap)
        for extra in self.extra:
            yield from extra()
        yield from self_metrics(snap, time.perf_counter() - started)
        yield GaugeMetricFamily(
            "sfmon_store_writable",
            "1 if a file can be created in the store directory (new workers can record).",
            value=_writable(self.directory),
        )


def _writable(directory: str) -> bool:
    # A read-only or full store goes unnoticed by running workers (their files are
    # mapped already); new workers then record nothing. Probe it once per scrape.
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return True


def families_from_snapshot(snap: Snapshot) -> Iterator[Metric]:
    """prometheus_client families for every family in *snap*, sorted by name."""
    for name in sorted(snap.families):
        fam = snap.families[name]
        meta = fam.meta
        labels = meta["labels"]
        kind = meta["type"]
        if kind == "counter":
            c = CounterMetricFamily(name, meta["help"], labels=labels)
            for values, q in fam.series.items():
                c.add_metric(values, q / VALUE_SCALE)
            yield c
        elif kind == "gauge":
            g = GaugeMetricFamily(name, meta["help"], labels=labels)
            for values, (value, _stamp) in fam.series.items():
                g.add_metric(values, value)
            yield g
        else:
            h = HistogramMetricFamily(name, meta["help"], labels=labels)
            for values, hv in fam.series.items():
                buckets = [(_go(b), float(n)) for b, n in hv.cumulative()]
                h.add_metric(values, buckets, hv.sum)
            yield h


def _go(bound: float) -> str:
    result: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return result


def self_metrics(snap: Snapshot, seconds: float) -> Iterator[Metric]:
    """sfmon's own health: scrape duration, files, corrupt files, folded workers."""
    yield GaugeMetricFamily(
        "sfmon_scrape_duration_seconds",
        "Time this scrape spent reading and merging the store.",
        value=seconds,
    )
    yield GaugeMetricFamily(
        "sfmon_store_files", "Store files read by this scrape.", value=snap.files_read
    )
    yield GaugeMetricFamily(
        "sfmon_store_files_skipped",
        "Store files this scrape could not read (corrupt or truncated).",
        value=len(snap.files_skipped),
    )
    yield CounterMetricFamily(
        "sfmon_store_corrupt_files",
        "Unreadable store files of dead workers, set aside as *.corrupt.",
        value=snap.corrupt_total,
    )
    yield CounterMetricFamily(
        "sfmon_store_folded_workers",
        "Dead workers whose files were folded into the archive.",
        value=snap.folded_total,
    )


def build_registry(collector: StoreCollector) -> CollectorRegistry:
    """A registry with sfmon's store plus the app's own prometheus_client metrics.

    Under ``PROMETHEUS_MULTIPROC_DIR`` the app's prometheus_client multiprocess
    metrics are merged by prometheus_client's own collector; otherwise the default
    registry's collectors are included.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if mp_dir and os.path.isdir(mp_dir):
        from prometheus_client.multiprocess import MultiProcessCollector

        from .pcfold import LockedCollector

        mpc = MultiProcessCollector(None, path=mp_dir)  # type: ignore[no-untyped-call]
        registry.register(LockedCollector(mpc, collector.directory))
    else:
        from prometheus_client import REGISTRY

        registry.register(_Forward(REGISTRY))
    return registry


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def _accepts_gzip(header: str | None) -> bool:
    if not header:
        return False
    for part in header.split(","):
        token, _, params = part.strip().partition(";")
        if token.strip().lower() in ("gzip", "*"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def render(
    registry: CollectorRegistry,
    accept: str | None,
    accept_encoding: str | None,
    *,
    protobuf: Callable[[], bytes] | None = None,
) -> tuple[bytes, list[tuple[str, str]]]:
    """Return ``(body, headers)`` for a scrape with these ``Accept`` headers.

    :param protobuf: produces the protobuf body; used only when the scraper asks
        for ``application/vnd.google.protobuf`` (a Prometheus without native
        histograms enabled fails the whole target on protobuf it did not ask for).
    """
    from .protobuf import CONTENT_TYPE as PROTOBUF_TYPE
    from .protobuf import negotiate

    fmt = negotiate(accept)
    if fmt == "protobuf" and protobuf is not None:
        body, ctype = protobuf(), PROTOBUF_TYPE
    elif fmt == "openmetrics":
        from prometheus_client.openmetrics import exposition as om

        body = om.generate_latest(registry)  # type: ignore[no-untyped-call]
        ctype = om.CONTENT_TYPE_LATEST
    else:
        from prometheus_client import exposition as text

        body = text.generate_latest(registry)
        ctype = "text/plain; version=0.0.4; charset=utf-8"
    headers = [("Content-Type", ctype), ("Vary", "Accept, Accept-Encoding")]
    if _accepts_gzip(accept_encoding):
        body = gzip.compress(body, compresslevel=1)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("Content-Length", str(len(body))))
    return body, headers
