"""The protobuf exposition of a scrape: every family, with native histogram buckets.

Families come from the same registry as the text formats. Histograms of sfmon's store
carry their native buckets (reduced to ``native_max_buckets``) beside the classic ones
in one message; every other family is converted from its prometheus_client samples.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry

from .exposition import StoreCollector
from .merge import HistogramValue
from .native import limit_signed_buckets
from .protobuf import (
    HistogramData,
    encode_counter_family,
    encode_gauge_family,
    encode_histogram_family,
    encode_untyped_family,
)

__all__ = ["histogram_data", "protobuf_body"]


def histogram_data(
    labels: tuple[tuple[str, str], ...],
    hv: HistogramValue,
    max_buckets: int,
    created: float | None,
) -> HistogramData:
    """One merged store histogram series as protobuf data, native part included."""
    classic = hv.cumulative()
    count = classic[-1][1]
    if hv.schema is None:
        return HistogramData(labels, count, hv.sum, classic, created=created)
    positive: dict[int, int] = {}
    negative: dict[int, int] = {}
    for key, n in hv.native.items():
        (negative if key & 1 else positive)[key >> 1] = n
    schema, positive, negative = limit_signed_buckets(hv.schema, positive, negative, max_buckets)
    native_total = hv.zero_count + sum(positive.values()) + sum(negative.values())
    return HistogramData(
        labels,
        max(count, native_total),  # a scrape may land between two slot updates
        hv.sum,
        classic,
        schema=schema,
        zero_threshold=hv.zero_threshold,
        zero_count=hv.zero_count,
        positive=positive,
        negative=negative,
        created=created,
    )


def _store_histogram(metric: Metric, collector: StoreCollector, created: float | None) -> bytes:
    snap = collector.last_snapshot
    fam = snap.families.get(metric.name) if snap is not None else None
    if fam is None:
        return _generic(metric)
    names = fam.meta["labels"]
    native = fam.meta.get("native") or {}
    max_buckets = int(native.get("max_buckets", 160))
    series = [
        histogram_data(tuple(zip(names, values)), hv, max_buckets, created)
        for values, hv in sorted(fam.series.items())
    ]
    return encode_histogram_family(metric.name, metric.documentation, series)


def _labels(sample: Any, drop: str = "") -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in sample.labels.items() if k != drop)


def _generic(metric: Metric, created_default: float | None = None) -> bytes:
    """Convert any prometheus_client family by its samples."""
    kind = metric.type
    name = metric.name
    doc = metric.documentation
    if kind == "counter":
        created: dict[tuple[tuple[str, str], ...], float] = {}
        values: dict[tuple[tuple[str, str], ...], float] = {}
        for s in metric.samples:
            if s.name.endswith("_created"):
                created[_labels(s)] = s.value
            else:
                values[_labels(s)] = s.value
        return encode_counter_family(
            name + "_total",
            doc,
            [(k, v, created.get(k, created_default)) for k, v in values.items()],
        )
    if kind in ("gauge", "info", "stateset"):
        full = name + "_info" if kind == "info" else name
        return encode_gauge_family(full, doc, [(_labels(s), s.value) for s in metric.samples])
    if kind == "histogram":
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for s in metric.samples:
            key = _labels(s, drop="le")
            entry = series.setdefault(key, {"buckets": [], "sum": 0.0, "count": 0})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), int(s.value)))
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
            elif s.name.endswith("_count"):
                entry["count"] = int(s.value)
        data = [
            HistogramData(k, e["count"], e["sum"], sorted(e["buckets"])) for k, e in series.items()
        ]
        return encode_histogram_family(name, doc, data)
    # summaries, gauge histograms, unknown: one untyped family per sample name
    by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
    for s in metric.samples:
        by_name.setdefault(s.name, []).append((_labels(s), s.value))
    return b"".join(encode_untyped_family(n, doc, samples) for n, samples in by_name.items())


def protobuf_body(
    registry: CollectorRegistry, collector: StoreCollector, created: float | None = None
) -> bytes:
    """The delimited protobuf body for one scrape of *registry*."""
    parts: list[bytes] = []
    store_names: set[str] = set()
    for metric in registry.collect():
        snap = collector.last_snapshot
        if snap is not None and not store_names:
            store_names = set(snap.families)
        if metric.type == "histogram" and metric.name in store_names:
            parts.append(_store_histogram(metric, collector, created))
        elif metric.type == "counter" and (metric.name + "_total") in store_names:
            parts.append(_generic(metric, created))  # store counters reset at service start
        else:
            parts.append(_generic(metric))
    return b"".join(parts)
