"""Bucket math for Prometheus native histograms: index, bounds, schema reduction, merging.

Pure functions, no I/O. The layout is the standard exponential one of the Prometheus spec
(``docs/native-histograms.md`` explains it), computed with client_golang's exact method.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "DEFAULT_SCHEMA",
    "DEFAULT_ZERO_THRESHOLD",
    "MAX_SCHEMA",
    "MIN_SCHEMA",
    "bucket_bounds",
    "bucket_index",
    "limit_buckets",
    "limit_signed_buckets",
    "make_indexer",
    "merge_buckets",
    "overflow_index",
    "quantile",
    "reduce_buckets",
    "reduce_index",
    "to_spans_deltas",
    "widen_zero_bucket",
]

# The standard exponential schemas of the spec; -53 (custom bounds) is never exposed.
MIN_SCHEMA = -4
MAX_SCHEMA = 8
# Schema 3: each bucket is 2**(1/8) ~ 1.09 times as wide as the one below (the bucket
# factor 1.1 that client_golang recommends), worst-case quantile error ~4 %.
DEFAULT_SCHEMA = 3
# client_golang's and client_java's default. It is a bucket boundary in every schema, so
# the zero bucket never cuts a regular bucket. sfmon records latency in milliseconds, where
# this means "exactly zero" in practice.
DEFAULT_ZERO_THRESHOLD = 2.0**-128

_MAX_FLOAT = 1.7976931348623157e308  # sys.float_info.max, spelt out for the reader
_INF = math.inf
_FRACTIONS: dict[int, tuple[float, ...]] = {}
_INDEXERS: dict[int, Callable[[float], int]] = {}


def _check_schema(schema: int) -> None:
    if isinstance(schema, bool) or not (
        isinstance(schema, int) and MIN_SCHEMA <= schema <= MAX_SCHEMA
    ):
        raise ValueError(f"schema must be an int in {MIN_SCHEMA}..{MAX_SCHEMA}, not {schema!r}")


def _fractions(schema: int) -> tuple[float, ...]:
    # Bucket upper bounds inside one power of two, as frexp fractions in [0.5, 1):
    # F[j] = 2**(j / 2**schema - 1), correctly rounded. client_golang hard-codes this
    # table; here pow() gives the first guess and an exact integer test fixes the last
    # bit, so boundaries do not depend on the libm. Built lazily: schema 3 takes 0.04 ms,
    # schema 8 ~20 ms.
    table = _FRACTIONS.get(schema)
    if table is None:
        n = 1 << max(schema, 0)
        out = []
        for j in range(n):
            m = int(2.0 ** (j / n - 1) * 2**53)  # the float is m / 2**53, 2**52 <= m < 2**53
            # Round to nearest: (m - 1/2) < F * 2**53 < (m + 1/2). Raise both sides to the
            # n-th power, times 2**n, to stay in integers: F**n * 2**(54 n) = 2**(53 n + j).
            target = 1 << (53 * n + j)
            while (2 * m + 1) ** n <= target:
                m += 1
            while (2 * m - 1) ** n >= target:
                m -= 1
            out.append(m / 2**53)
        table = _FRACTIONS[schema] = tuple(out)
    return table


def overflow_index(schema: int) -> int:
    """Return the index of the ±Inf overflow bucket: one above the bucket of the float max.

    >>> overflow_index(3), overflow_index(8), overflow_index(-4)
    (8193, 262145, 65)
    """
    _check_schema(schema)
    if schema > 0:
        return (1024 << schema) + 1
    return ((1024 + (1 << -schema) - 1) >> -schema) + 1


def make_indexer(schema: int) -> Callable[[float], int]:
    """Return a fast ``index(v)`` for positive *v* at *schema* (the per-request hot path).

    *v* must be > 0 (callers route ``|v| <= zero_threshold`` to the zero bucket first
    and pass ``-v`` for negative observations); ``+inf`` gives the overflow index. The
    closure binds the table and functions it needs, so one call is a ``frexp``, a
    ``bisect`` over 2**schema floats and a few integer operations.

    >>> index = make_indexer(3)
    >>> index(1.0), index(1.05), index(2.0), index(0.001)
    (0, 1, 8, -79)
    """
    _check_schema(schema)
    frexp = math.frexp
    inf = _INF
    overflow = overflow_index(schema)
    if schema > 0:
        table = _fractions(schema)
        search = bisect.bisect_left
        n = 1 << schema  # the index is bisect + (exp - 1) * n

        def index(v: float) -> int:
            if v < inf:
                frac, exp = frexp(v)
                # bisect_left: a value equal to a boundary belongs to the bucket below,
                # because upper bounds are inclusive.
                return search(table, frac) + (exp << schema) - n
            return overflow

        return index

    shift = -schema
    offset = (1 << shift) - 1

    def index_coarse(v: float) -> int:
        if v < inf:
            frac, exp = frexp(v)
            # Schema 0 index is exp, except for exact powers of two (frac 0.5), which
            # are the inclusive upper bound of the bucket below. Then ceil(i / 2**shift).
            if frac == 0.5:
                exp -= 1
            return (exp + offset) >> shift
        return overflow

    return index_coarse


def bucket_index(value: float, schema: int) -> int:
    """Return the index of the bucket holding *value* (non-zero; the sign is ignored).

    Bucket ``i`` holds ``(base**(i-1), base**i]`` with ``base = 2**2**-schema``; negative
    values use the mirrored bucket of ``|value|``; ``±inf`` the overflow bucket. Exact at
    every boundary (``frexp`` and a table, not ``log2``).

    >>> bucket_index(1.0, 0), bucket_index(1.5, 0), bucket_index(-3.0, 0)
    (0, 1, 2)
    """
    _check_schema(schema)
    index = _INDEXERS.get(schema)
    if index is None:
        index = _INDEXERS[schema] = make_indexer(schema)
    v = abs(value)
    if not v > 0:
        raise ValueError(f"value must be non-zero and not NaN, not {value!r}")
    return index(v)


def bucket_bounds(index: int, schema: int) -> tuple[float, float]:
    """Return ``(lower, upper)`` of positive bucket *index*: lower exclusive, upper inclusive.

    The same floats that :func:`bucket_index` compares against (and that Prometheus
    computes), so ``lower < v <= upper`` holds exactly for every normal float *v*. The
    bucket of the float max ends at the float max; the overflow bucket above it ends at
    ``inf``. The negative bucket *index* is ``[-upper, -lower)``.

    >>> bucket_bounds(0, 3)
    (0.9170040432046712, 1.0)
    >>> bucket_bounds(2, -1)
    (4.0, 16.0)
    """
    overflow = overflow_index(schema)
    if index > overflow:
        raise ValueError(f"bucket {index} is above the overflow bucket {overflow}")
    return _upper(index - 1, schema, overflow), _upper(index, schema, overflow)


def _upper(index: int, schema: int, overflow: int) -> float:
    if index >= overflow - 1:
        return _INF if index == overflow else _MAX_FLOAT
    if schema > 0:
        table = _fractions(schema)
        return math.ldexp(table[index & (len(table) - 1)], (index >> schema) + 1)
    return math.ldexp(1.0, index << -schema)


def reduce_index(index: int, steps: int) -> int:
    """Return the index of bucket *index* after lowering the schema by *steps*.

    Each step merges buckets ``2j-1`` and ``2j`` into ``j``, so the result is
    ``ceil(index / 2**steps)``.

    >>> reduce_index(5, 1), reduce_index(-5, 1), reduce_index(0, 3)
    (3, -2, 0)
    """
    return -((-index) >> steps)


def reduce_buckets(buckets: Mapping[int, int], steps: int) -> dict[int, int]:
    """Return *buckets* (``{index: count}``) after lowering their schema by *steps*.

    Empty buckets (count 0) are dropped.

    >>> reduce_buckets({1: 2, 2: 3, 3: 1}, 1)
    {1: 5, 2: 1}
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    out: dict[int, int] = {}
    for i, n in buckets.items():
        if n:
            j = -((-i) >> steps)
            out[j] = out.get(j, 0) + n
    return out


def merge_buckets(parts: Iterable[tuple[int, Mapping[int, int]]]) -> tuple[int, dict[int, int]]:
    """Sum ``(schema, {index: count})`` parts at their lowest schema; return ``(schema, sum)``.

    Exact, associative and order-free, like summing classic buckets: a bucket of a finer
    schema lies entirely inside one bucket of any coarser schema.

    >>> merge_buckets([(3, {1: 2}), (2, {1: 1}), (3, {8: 1})])
    (2, {1: 3, 4: 1})
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_buckets needs at least one part")
    schema = min(s for s, _ in parts)
    _check_schema(schema)
    out: dict[int, int] = {}
    for s, buckets in parts:
        _check_schema(s)
        steps = s - schema
        for i, n in buckets.items():
            if n:
                j = -((-i) >> steps)
                out[j] = out.get(j, 0) + n
    return schema, out


def limit_buckets(
    schema: int, buckets: Mapping[int, int], max_buckets: int
) -> tuple[int, dict[int, int]]:
    """Lower the schema one step at a time until at most *max_buckets* are populated.

    Stops at :data:`MIN_SCHEMA` even if still over the limit (client_golang's last
    remedy, "doubleBucketWidth"). Returns ``(schema, buckets)``.

    >>> limit_buckets(3, {1: 1, 2: 1, 3: 1, 4: 1}, 2)
    (2, {1: 2, 2: 2})
    """
    _check_schema(schema)
    out = {i: n for i, n in buckets.items() if n}
    while len(out) > max_buckets and schema > MIN_SCHEMA:
        out = reduce_buckets(out, 1)
        schema -= 1
    return schema, out


def limit_signed_buckets(
    schema: int, positive: Mapping[int, int], negative: Mapping[int, int], max_buckets: int
) -> tuple[int, dict[int, int], dict[int, int]]:
    """:func:`limit_buckets` for both sides: the limit counts positive plus negative buckets.

    Both sides share one schema, as they do in the exposition. Returns
    ``(schema, positive, negative)``.

    >>> limit_signed_buckets(1, {1: 1, 2: 1}, {1: 1}, 2)
    (0, {1: 2}, {1: 1})
    """
    _check_schema(schema)
    pos = {i: n for i, n in positive.items() if n}
    neg = {i: n for i, n in negative.items() if n}
    while len(pos) + len(neg) > max_buckets and schema > MIN_SCHEMA:
        pos, neg = reduce_buckets(pos, 1), reduce_buckets(neg, 1)
        schema -= 1
    return schema, pos, neg


def to_spans_deltas(buckets: Mapping[int, int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Encode ``{index: count}`` as native-histogram spans and deltas.

    Spans are ``(offset, length)``: the first offset is the absolute index of the first
    bucket, later ones the number of buckets skipped since the previous span ended.
    Deltas are the first count, then each count minus the one before. Gaps of one or
    two empty buckets are filled with explicit zeros instead of a new span, which is
    smaller on the wire (client_golang's rule). Empty buckets are dropped otherwise.

    >>> to_spans_deltas({-2: 3, -1: 5, 3: 1, 5: 3, 6: 2})  # gap of 3, then of 1
    ([(-2, 2), (3, 4)], [3, 2, -4, -1, 3, -1])
    """
    spans: list[tuple[int, int]] = []
    deltas: list[int] = []
    start = length = 0  # current span
    nxt = prev = 0  # index after the current span, previous count
    for i in sorted(buckets):
        n = buckets[i]
        if not n:
            continue
        gap = i - nxt
        if not deltas:
            start, length = i, 0
        elif gap > 2:
            spans.append((start, length))
            start, length = gap, 0
        elif gap:
            # One or two empty buckets: two 1-byte zero deltas (the second is really
            # "0 - 0") cost less than the 4+ bytes of another span.
            deltas.append(-prev)
            if gap == 2:
                deltas.append(0)
            length += gap
            prev = 0
        deltas.append(n - prev)
        prev = n
        length += 1
        nxt = i + 1
    if deltas:
        spans.append((start, length))
    return spans, deltas


def widen_zero_bucket(
    schema: int,
    zero_threshold: float,
    positive: Mapping[int, int],
    negative: Mapping[int, int],
) -> tuple[float, int, dict[int, int], dict[int, int]]:
    """Fold every bucket that reaches into ``[-zero_threshold, zero_threshold]`` into zero.

    For merging histograms with different zero thresholds (spec, "Zero bucket"): call it
    with the largest threshold on each part. A bucket that straddles the threshold moves
    whole and the threshold grows to its upper bound. Returns ``(threshold, moved,
    positive, negative)``; add *moved* to the zero count. Use the returned threshold for
    the other parts until it stops growing.

    >>> widen_zero_bucket(0, 1.5, {0: 1, 1: 2, 2: 4}, {})
    (2.0, 3, {2: 4}, {})
    """
    overflow = overflow_index(schema)
    populated = [i for side in (positive, negative) for i, n in side.items() if n]
    threshold = zero_threshold
    for i in populated:
        if _upper(i - 1, schema, overflow) < zero_threshold:
            threshold = max(threshold, _upper(i, schema, overflow))
    # The grown threshold is a bucket boundary, so every bucket starting below it now
    # lies wholly inside the zero bucket, on both sides (they mirror each other).
    moved = 0
    pos: dict[int, int] = {}
    neg: dict[int, int] = {}
    for side, out in ((positive, pos), (negative, neg)):
        for i, n in side.items():
            if n and _upper(i - 1, schema, overflow) < threshold:
                moved += n
            elif n:
                out[i] = n
    return threshold, moved, pos, neg


def quantile(
    q: float,
    schema: int,
    positive: Mapping[int, int],
    *,
    negative: Mapping[int, int] | None = None,
    zero_count: int = 0,
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
) -> float:
    """Estimate the *q*-quantile (0 <= q <= 1) of a native histogram.

    Interpolation is exponential inside a regular bucket (observations spread evenly
    over the log scale, the assumption behind exponential buckets) and linear inside the
    zero bucket, whose lower end is 0 when there are no negative buckets: what newer
    PromQL does (prometheus/prometheus#14677; 2.42 interpolates linearly). The estimate
    always lies in the bucket holding the quantile. NaN when there are no observations.

    >>> round(quantile(0.5, 0, {1: 1, 2: 1}), 6)  # buckets (1, 2] and (2, 4]
    2.0
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], not {q!r}")
    overflow = overflow_index(schema)
    neg = {i: n for i, n in (negative or {}).items() if n}
    pos = {i: n for i, n in positive.items() if n}
    # Buckets in value order: negatives from the most negative (highest index) up, then
    # the zero bucket, then positives. Each entry: (count, lower, upper, exponential?).
    ordered: list[tuple[int, float, float, bool]] = []
    for i in sorted(neg, reverse=True):
        lo, hi = _upper(i, schema, overflow), _upper(i - 1, schema, overflow)
        ordered.append((neg[i], -lo, -hi, True))
    if zero_count:
        lo = 0.0 if not neg else -zero_threshold
        hi = 0.0 if neg and not pos else zero_threshold
        ordered.append((zero_count, lo, hi, False))
    for i in sorted(pos):
        ordered.append(
            (pos[i], _upper(i - 1, schema, overflow), _upper(i, schema, overflow), True)
        )
    total = sum(n for n, *_ in ordered)
    if not total:
        return math.nan
    rank = q * total
    k = seen = 0
    while k < len(ordered) - 1 and seen + ordered[k][0] < rank:
        seen += ordered[k][0]
        k += 1
    n, lo, hi, exponential = ordered[k]  # the bucket holding the rank-th observation
    fraction = (rank - seen) / n
    if math.isinf(hi):
        return lo  # overflow bucket: nothing to interpolate in
    if math.isinf(lo):
        return hi
    if not exponential or lo == 0 or hi == 0:  # zero bucket (or an underflowed bound)
        return lo + (hi - lo) * fraction
    # Log-linear from lo to hi; lo and hi have the same sign in a regular bucket.
    a, b = math.log2(abs(lo)), math.log2(abs(hi))
    return math.copysign(math.pow(2.0, a + (b - a) * fraction), lo)
