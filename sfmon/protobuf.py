"""Prometheus protobuf exposition, hand-encoded: delimited ``io.prometheus.client.MetricFamily``.

Counters, gauges, untyped values and histograms (classic and native buckets in one
message, as client_golang sends them), plus the ``Accept`` negotiation that decides
when a scraper gets this format. No dependency on the ``protobuf`` package.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .native import DEFAULT_ZERO_THRESHOLD, to_spans_deltas

__all__ = [
    "CONTENT_TYPE",
    "COUNTER",
    "GAUGE",
    "HISTOGRAM",
    "UNTYPED",
    "HistogramData",
    "Labels",
    "encode_counter_family",
    "encode_gauge_family",
    "encode_histogram_family",
    "encode_untyped_family",
    "negotiate",
]

CONTENT_TYPE = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)

# MetricType values of io/prometheus/client/metrics.proto (SUMMARY = 2 is not used here).
COUNTER, GAUGE, UNTYPED, HISTOGRAM = 0, 1, 3, 4

Labels = Sequence[tuple[str, str]]
"""``[(name, value), ...]``, written in the order given (Prometheus sorts on ingest)."""

# Wire keys, (field number << 3) | wire type, all one byte because every field is < 16.
# Wire types: 0 varint, 1 fixed64 (double), 2 length-delimited.
_F1_VARINT, _F1_DOUBLE, _F1_LEN = b"\x08", b"\x09", b"\x0a"
_F2_VARINT, _F2_DOUBLE, _F2_LEN = b"\x10", b"\x11", b"\x12"
_F3_VARINT, _F3_LEN, _F4_LEN = b"\x18", b"\x1a", b"\x22"
_F5_LEN, _F7_LEN = b"\x2a", b"\x3a"
# Histogram: 5 schema (sint32), 6 zero_threshold, 7 zero_count, 9/10 negative span/delta,
# 12/13 positive span/delta, 15 created_timestamp.
_H_SCHEMA, _H_ZERO_THRESHOLD, _H_ZERO_COUNT = b"\x28", b"\x31", b"\x38"
_H_NEG_SPAN, _H_NEG_DELTA = b"\x4a", b"\x52"
_H_POS_SPAN, _H_POS_DELTA = b"\x62", b"\x6a"
_H_CREATED = b"\x7a"
# BucketSpan{offset: 0, length: 0}: the spec's marker for a native histogram that has no
# populated bucket, without which it looks like a classic histogram with no buckets.
_NOOP_SPAN = _H_POS_SPAN + b"\x04" + _F1_VARINT + b"\x00" + _F2_VARINT + b"\x00"

_MASK64 = (1 << 64) - 1
_SMALL = [bytes((i,)) for i in range(128)]
# Field 3 key, Bucket length and the Bucket's field 1 key, by length of the count varint.
_BUCKET_HEAD = [b""] + [_F3_LEN + _SMALL[1 + n + 9] + _F1_VARINT for n in range(1, 11)]
_double = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    # Unrolled for the lengths that bucket counts have; the encoder spends most of its
    # time here (~200 calls per histogram series).
    if n < 0x80:
        if n >= 0:
            return _SMALL[n]
        n &= _MASK64  # a negative int64 goes out as its 10-byte two's complement
    elif n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    elif n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zigzag(n: int) -> bytes:
    # sint32/sint64: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ..., so small negatives stay short.
    return _varint(n << 1 if n >= 0 else (-n << 1) - 1)


def _field(key: bytes, body: bytes) -> bytes:
    return key + _varint(len(body)) + body


def _text(s: str) -> bytes:
    # Protobuf strings (and Prometheus label values) must be valid UTF-8; a lone
    # surrogate would otherwise fail the whole scrape.
    return s.encode("utf-8", "replace")


def _timestamp(key: bytes, seconds: float | None) -> bytes:
    # google.protobuf.Timestamp{1 seconds int64, 2 nanos int32 in [0, 1e9)}; proto3, so
    # zero fields are left out. None or a non-finite time: no field at all.
    if seconds is None or not math.isfinite(seconds):
        return b""
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    body = (_F1_VARINT + _varint(whole) if whole else b"") + (
        _F2_VARINT + _varint(nanos) if nanos else b""
    )
    return _field(key, body)


class _LabelCache(dict[tuple[str, str], bytes]):
    # One family's series repeat the same (name, value) pairs; encode each once.
    def __missing__(self, pair: tuple[str, str]) -> bytes:
        body = _field(_F1_LEN, _text(pair[0])) + _field(_F2_LEN, _text(pair[1]))
        encoded = self[pair] = _field(_F1_LEN, body)
        return encoded


def _family(name: str, help: str, kind: int, metrics: list[bytes], unit: str) -> bytes:
    if not metrics:
        # client_golang drops families without series; so do we.
        return b""
    head = _field(_F1_LEN, _text(name)) + _field(_F2_LEN, _text(help)) + _F3_VARINT + _SMALL[kind]
    body = b"".join([head, *(_field(_F4_LEN, m) for m in metrics)])
    if unit:
        body += _field(_F5_LEN, _text(unit))
    return _varint(len(body)) + body


def encode_counter_family(
    name: str,
    help: str,
    samples: Iterable[tuple[Labels, float, float | None]],
    *,
    unit: str = "",
) -> bytes:
    """Encode one delimited COUNTER family; *samples* are ``(labels, value, created)``.

    *name* is the full series name, ``_total`` included: over protobuf Prometheus uses
    the family name as is (client_golang's families are named ``..._total``). *created*
    is the Unix time in seconds when the series started (``Counter.created_timestamp``),
    or ``None``. A family without samples encodes to ``b""``.

    .. code-block:: python

        body = encode_counter_family(
            "softfactory_requests_total", "Completed requests",
            [((("method", "GET"), ("path", "/"), ("status", "200")), 42.0, started)],
        )
    """
    labels = _LabelCache()
    metrics = [
        b"".join(labels[pair] for pair in pairs)
        + _field(_F3_LEN, _F1_DOUBLE + _double(value) + _timestamp(_F3_LEN, created))
        for pairs, value, created in samples
    ]
    return _family(name, help, COUNTER, metrics, unit)


def encode_gauge_family(
    name: str, help: str, samples: Iterable[tuple[Labels, float]], *, unit: str = ""
) -> bytes:
    """Encode one delimited GAUGE family; *samples* are ``(labels, value)``.

    .. code-block:: python

        body = encode_gauge_family("softfactory_up", "1 if healthy", [((), 1.0)])
    """
    labels = _LabelCache()
    metrics = [
        b"".join(labels[pair] for pair in pairs) + _field(_F2_LEN, _F1_DOUBLE + _double(value))
        for pairs, value in samples
    ]
    return _family(name, help, GAUGE, metrics, unit)


def encode_untyped_family(
    name: str, help: str, samples: Iterable[tuple[Labels, float]], *, unit: str = ""
) -> bytes:
    """Encode one delimited UNTYPED family; *samples* are ``(labels, value)``.

    .. code-block:: python

        body = encode_untyped_family("softfactory_build_info", "", [((("v", "1.2"),), 1.0)])
    """
    labels = _LabelCache()
    metrics = [
        b"".join(labels[pair] for pair in pairs) + _field(_F5_LEN, _F1_DOUBLE + _double(value))
        for pairs, value in samples
    ]
    return _family(name, help, UNTYPED, metrics, unit)


@dataclass(frozen=True, slots=True)
class HistogramData:
    """One histogram series for :func:`encode_histogram_family`.

    *buckets* are the classic ``(upper_bound, cumulative_count)`` pairs in increasing
    order, ``+Inf`` included. Setting *schema* adds the native part: ``{index: count}``
    for *positive* and *negative* buckets (see :mod:`sfmon.native`), *zero_count*
    observations with ``|v| <= zero_threshold``. *count* must be at least the sum of
    the native counts (Prometheus rejects the sample otherwise). *created* is the Unix
    time in seconds when the series started, or ``None``.

    .. code-block:: python

        # Observations 2.0, 9.5 and 30.0 ms:
        HistogramData(labels=(("path", "/"),), count=3, sum=41.5,
                      buckets=[(10.0, 2), (100.0, 3), (math.inf, 3)],
                      schema=3, zero_count=0, positive={8: 1, 26: 1, 40: 1})
    """

    labels: Labels
    count: int
    sum: float
    buckets: Sequence[tuple[float, int]] = ()
    schema: int | None = None
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD
    zero_count: int = 0
    positive: Mapping[int, int] | None = None
    negative: Mapping[int, int] | None = None
    created: float | None = None


def _spans(key_span: bytes, key_delta: bytes, buckets: Mapping[int, int] | None) -> bytes:
    if not buckets:
        return b""
    spans, deltas = to_spans_deltas(buckets)
    if not spans:
        return b""
    out = [
        _field(key_span, _F1_VARINT + _zigzag(offset) + _F2_VARINT + _varint(length))
        for offset, length in spans
    ]
    # Packed repeated sint64: proto2 declares it unpacked, but every parser must accept
    # both forms and packed is ~half the size (Prometheus 2.42 verified, research §3.3).
    # sint64 zigzag inlined: deltas are int64 by definition, so (d >> 63) is 0 or -1.
    zigzags = [(d << 1) ^ (d >> 63) for d in deltas]
    out.append(
        _field(key_delta, b"".join([_SMALL[z] if z < 0x80 else _varint(z) for z in zigzags]))
    )
    return b"".join(out)


def _histogram(h: HistogramData, bound_keys: dict[float, bytes]) -> bytes:
    parts = [_F1_VARINT, _varint(int(h.count)), _F2_DOUBLE, _double(h.sum)]
    for bound, cumulative in h.buckets:
        key = bound_keys.get(bound)
        if key is None:
            key = bound_keys[bound] = _F2_DOUBLE + _double(bound)
        count = _varint(int(cumulative))
        # Bucket{1 cumulative_count, 2 upper_bound}: 1 + len(count) + 9 bytes, always < 128.
        parts += (_BUCKET_HEAD[len(count)], count, key)
    if h.schema is not None:
        parts += [
            _H_SCHEMA,
            _zigzag(h.schema),
            _H_ZERO_THRESHOLD,
            _double(h.zero_threshold),
            _H_ZERO_COUNT,
            _varint(int(h.zero_count)),
        ]
        negative = _spans(_H_NEG_SPAN, _H_NEG_DELTA, h.negative)
        positive = _spans(_H_POS_SPAN, _H_POS_DELTA, h.positive)
        parts += [negative, positive if positive or negative else _NOOP_SPAN]
    parts.append(_timestamp(_H_CREATED, h.created))
    return b"".join(parts)


def encode_histogram_family(
    name: str, help: str, series: Iterable[HistogramData], *, unit: str = ""
) -> bytes:
    """Encode one delimited HISTOGRAM family from :class:`HistogramData` series.

    *name* is the base name (no ``_bucket``/``_sum``/``_count``). Classic and native
    buckets share one ``Histogram`` message, as in client_golang; a scraper with native
    histograms enabled keeps the native part (Prometheus 2.42: only that), others the
    classic one. A native histogram with no populated bucket carries the no-op span.

    .. code-block:: python

        body = encode_histogram_family(
            "softfactory_request_latency_ms", "Request latency", [series]
        )
    """
    labels = _LabelCache()
    bound_keys: dict[float, bytes] = {}
    metrics = [
        b"".join(labels[pair] for pair in h.labels) + _field(_F7_LEN, _histogram(h, bound_keys))
        for h in series
    ]
    return _family(name, help, HISTOGRAM, metrics, unit)


# --------------------------------------------------------------------- negotiation

_PROTO = "application/vnd.google.protobuf"
_OPENMETRICS = "application/openmetrics-text"
# Versions whose content we produce: OpenMetrics 1.0 (0.0.1 is its pre-release name),
# text 0.0.4 (1.0.0 is the same lines with UTF-8 names quoted, which sfmon never needs).
_OM_VERSIONS = (None, "1.0.0", "0.0.1")
_TEXT_VERSIONS = (None, "0.0.4", "1.0.0")


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    ranges = []
    for item in accept.split(","):
        media, *raw = item.split(";")
        media = media.strip().lower()
        if "/" not in media:
            continue
        params: dict[str, str] = {}
        q = 1.0
        for param in raw:
            key, _, value = param.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # unreadable weight: treat as "not acceptable"
                if not 0.0 <= q <= 1.0:
                    q = 0.0
            else:
                params[key] = value
        ranges.append((media, params, q))
    return ranges


def negotiate(accept: str | None) -> str:
    """Pick ``"protobuf"``, ``"openmetrics"`` or ``"text"`` for an ``Accept`` header.

    Each format gets the weight of the most specific media range that matches it
    (RFC 9110); the heaviest wins, ties go to the range listed first. Protobuf must be
    named explicitly with ``proto=io.prometheus.client.MetricFamily`` and
    ``encoding=delimited``: a Prometheus without native histograms enabled never asks
    for it and takes the whole target down when it gets it (research §3.7). Wildcards
    prefer text; no header, or nothing we serve, gives text.

    >>> negotiate("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    'openmetrics'
    >>> negotiate("*/*")
    'text'
    """
    if not accept:
        return "text"
    # best[fmt] = (specificity, -position, q) of the most specific range matching fmt.
    best: dict[str, tuple[int, int, float]] = {}
    for position, (media, params, q) in enumerate(_media_ranges(accept)):
        extra = len(params)
        matches: list[tuple[str, int]] = []
        if media == _PROTO:
            if (
                params.get("proto") == "io.prometheus.client.MetricFamily"
                and params.get("encoding") == "delimited"
            ):
                matches.append(("protobuf", 20 + extra))
        elif media == _OPENMETRICS:
            if params.get("version") in _OM_VERSIONS:
                matches.append(("openmetrics", 20 + extra))
        elif media == "text/plain":
            if params.get("version") in _TEXT_VERSIONS:
                matches.append(("text", 20 + extra))
        elif media == "text/*":
            matches.append(("text", 10))
        elif media == "application/*":
            matches.append(("openmetrics", 10))
        elif media == "*/*":
            matches += [("text", 0), ("openmetrics", 0)]
        for fmt, specificity in matches:
            known = best.get(fmt)
            if known is None or specificity > known[0]:
                best[fmt] = (specificity, -position, q)
    # Heaviest q; then the more explicit range; then the earlier one; text before
    # OpenMetrics when a wildcard is all that matched both.
    order = {"text": 2, "openmetrics": 1, "protobuf": 0}
    ranked = sorted(
        (
            (q, specificity, position, order[fmt], fmt)
            for fmt, (specificity, position, q) in best.items()
        ),
        reverse=True,
    )
    if ranked and ranked[0][0] > 0:
        return ranked[0][4]
    return "text"
