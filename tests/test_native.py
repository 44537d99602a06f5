"""Native-histogram bucket math: index, bounds, reduction, merging, limits, spans."""

from __future__ import annotations

import doctest
import math
import random
import sys
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfmon import native
from sfmon.native import (
    DEFAULT_SCHEMA,
    DEFAULT_ZERO_THRESHOLD,
    MAX_SCHEMA,
    MIN_SCHEMA,
    bucket_bounds,
    bucket_index,
    limit_buckets,
    limit_signed_buckets,
    make_indexer,
    merge_buckets,
    overflow_index,
    quantile,
    reduce_buckets,
    reduce_index,
    to_spans_deltas,
    widen_zero_bucket,
)

SCHEMAS = range(MIN_SCHEMA, MAX_SCHEMA + 1)
MAX = sys.float_info.max
MIN_NORMAL = sys.float_info.min
PROPERTY = settings(database=None, deadline=None)
normal_floats = st.floats(min_value=MIN_NORMAL, max_value=MAX)


# -- independent references ----------------------------------------------------------


def ref_boundary(i: int, schema: int) -> float:
    """Upper bound of bucket i, 2**(i / 2**schema) from 60-digit decimals, rounded once."""
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(2) ** (Decimal(i) / Decimal(2) ** schema)
    return float(exact)  # Decimal -> float is correctly rounded


def ref_index(v: float, schema: int) -> int:
    """The bucket of v by exact rational arithmetic: the least i with v <= 2**(i/2**schema).

    Prometheus' boundaries are floats, so a float that *is* a rounded boundary belongs to
    the bucket below even when the real boundary is a hair smaller; handled at the end.
    """
    x = Fraction(abs(v))
    guess = math.floor(math.log2(abs(v)) * 2.0**schema)
    if schema >= 0:
        n = 1 << schema

        def le(i: int) -> bool:  # x <= 2**(i/n)  <=>  x**n <= 2**i
            return x**n <= Fraction(2) ** i
    else:
        k = 1 << -schema

        def le(i: int) -> bool:
            return x <= Fraction(2) ** (i * k)

    i = guess - 2
    while not le(i):
        i += 1
    while le(i - 1):
        i -= 1
    if ref_boundary(i - 1, schema) == abs(v):
        i -= 1
    return i


def decode_spans(spans: list[tuple[int, int]], deltas: list[int]) -> dict[int, int]:
    """Test-side decoder of spans/deltas (the spec's "Buckets" section)."""
    out: dict[int, int] = {}
    deltas_iter = iter(deltas)
    index, count = 0, 0
    for n, (offset, length) in enumerate(spans):
        index = offset if n == 0 else index + offset
        for _ in range(length):
            count += next(deltas_iter)
            if count:
                out[index] = count
            index += 1
    assert next(deltas_iter, None) is None, "more deltas than span lengths"
    return out


def histogram(values: list[float], schema: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        i = bucket_index(v, schema)
        out[i] = out.get(i, 0) + 1
    return out


def test_docstring_examples() -> None:
    assert doctest.testmod(native).failed == 0


# -- constants ----------------------------------------------------------------------


def test_constants() -> None:
    assert (MIN_SCHEMA, MAX_SCHEMA, DEFAULT_SCHEMA) == (-4, 8, 3)
    assert DEFAULT_ZERO_THRESHOLD == 2.0**-128
    # 2**-128 is a bucket boundary in every schema, so the zero bucket never cuts one.
    for s in SCHEMAS:
        assert bucket_bounds(bucket_index(DEFAULT_ZERO_THRESHOLD, s), s)[1] == 2.0**-128


@pytest.mark.parametrize("schema", range(1, MAX_SCHEMA + 1))
def test_fraction_table_is_correctly_rounded(schema: int) -> None:
    table = native._fractions(schema)
    assert len(table) == 1 << schema
    assert [ref_boundary(j - (1 << schema), schema) for j in range(1 << schema)] == list(table)


# -- bucket_index -------------------------------------------------------------------


def boundary_indices(schema: int) -> list[int]:
    per_octave = 1 << max(schema, 0)
    step = 1 << max(-schema, 0)
    near_one = range(-4 * per_octave, 4 * per_octave + 1)
    rng = random.Random(schema)
    # Across the normal range: 2**-1022 .. the bucket below the one holding MAX.
    lowest = -1022 * per_octave // step
    highest = overflow_index(schema) - 2
    spread = [rng.randint(lowest, highest) for _ in range(300)]
    return sorted({*near_one, *spread, lowest, highest})


@pytest.mark.parametrize("schema", SCHEMAS)
def test_bucket_index_at_boundaries(schema: int) -> None:
    index = make_indexer(schema)
    for i in boundary_indices(schema):
        upper = ref_boundary(i, schema)
        assert bucket_index(upper, schema) == i, (schema, i)  # upper bound inclusive
        assert bucket_index(math.nextafter(upper, 0), schema) == i, (schema, i)
        assert bucket_index(math.nextafter(upper, math.inf), schema) == i + 1, (schema, i)
        assert index(upper) == i
        assert index(math.nextafter(upper, math.inf)) == i + 1


@pytest.mark.parametrize("schema", SCHEMAS)
def test_bucket_index_random_values_match_exact_reference(schema: int) -> None:
    rng = random.Random(100 + schema)
    values = [rng.lognormvariate(0, 8) for _ in range(400)]
    values += [2.0 ** rng.uniform(-1020, 1023) for _ in range(200)]
    for v in values:
        assert bucket_index(v, schema) == ref_index(v, schema), (v, schema)


@PROPERTY
@given(v=normal_floats, schema=st.sampled_from(SCHEMAS))
def test_bucket_index_property(v: float, schema: int) -> None:
    i = bucket_index(v, schema)
    assert i == ref_index(v, schema)
    assert i == make_indexer(schema)(v)
    lower, upper = bucket_bounds(i, schema)
    assert lower < v <= upper


def test_bucket_index_examples() -> None:
    # Schema 0: (0.5, 1] is 0, (1, 2] is 1, (2, 4] is 2.
    assert [bucket_index(v, 0) for v in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)] == [
        -1,
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    # Schema 3 around 1 ms and 1 s in milliseconds.
    assert bucket_index(1.0, 3) == 0
    assert bucket_index(1000.0, 3) == 80  # 2**(80/8) = 1024 >= 1000 > 2**(79/8) = 957
    # Schema -2 (base 16): (1, 16] is 1, (16, 256] is 2.
    assert [bucket_index(v, -2) for v in (1.0, 1.01, 16.0, 16.5, 256.0)] == [0, 1, 1, 2, 2]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_infinity_and_max_float(schema: int) -> None:
    overflow = overflow_index(schema)
    assert bucket_index(MAX, schema) == overflow - 1
    assert bucket_index(math.inf, schema) == overflow
    assert bucket_index(-math.inf, schema) == overflow
    assert make_indexer(schema)(math.inf) == overflow
    assert bucket_bounds(overflow - 1, schema)[1] == MAX
    assert bucket_bounds(overflow, schema) == (MAX, math.inf)
    with pytest.raises(ValueError, match="above the overflow"):
        bucket_bounds(overflow + 1, schema)


def test_overflow_index_matches_spec() -> None:
    # The spec: at schema 8 the bucket of MaxFloat64 is 262144, the +Inf bucket 262145.
    assert overflow_index(8) == 262145
    assert [overflow_index(s) for s in (-4, -1, 0, 1, 3)] == [65, 513, 1025, 2049, 8193]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_negative_values_mirror(schema: int) -> None:
    rng = random.Random(schema)
    for _ in range(200):
        v = rng.lognormvariate(0, 10)
        assert bucket_index(-v, schema) == bucket_index(v, schema)


@pytest.mark.parametrize("bad", [0.0, -0.0, math.nan])
def test_bucket_index_rejects_zero_and_nan(bad: float) -> None:
    with pytest.raises(ValueError, match="non-zero"):
        bucket_index(bad, 3)


@pytest.mark.parametrize("schema", [-5, 9, 3.0, "3", True, None])
def test_bad_schema(schema: object) -> None:
    with pytest.raises(ValueError, match="schema"):
        make_indexer(schema)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema"):
        bucket_index(1.0, schema)  # type: ignore[arg-type]


def test_subnormal_values_get_their_bucket() -> None:
    # Below the normal range the index still follows frexp exactly.
    tiny = 5e-324  # 2**-1074
    assert bucket_index(tiny, 0) == -1074
    assert bucket_index(tiny, 3) == -1074 * 8
    assert bucket_index(2.0**-1030, -4) == math.ceil(-1030 / 16)


# -- bucket_bounds ------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS)
def test_bucket_bounds_match_formula(schema: int) -> None:
    indices = boundary_indices(schema)
    for i in indices[1:]:  # the lowest one's lower bound is subnormal, rounded by ldexp
        assert bucket_bounds(i, schema) == (ref_boundary(i - 1, schema), ref_boundary(i, schema))


def test_bucket_bounds_examples() -> None:
    assert bucket_bounds(0, 0) == (0.5, 1.0)
    assert bucket_bounds(1, 0) == (1.0, 2.0)
    assert bucket_bounds(8, 3) == (2.0 ** (7 / 8), 2.0)
    assert bucket_bounds(-1, -4) == (2.0**-32, 2.0**-16)


# -- reduction and merging ----------------------------------------------------------


def test_reduce_index_examples() -> None:
    assert [reduce_index(i, 1) for i in range(-4, 5)] == [-2, -1, -1, 0, 0, 1, 1, 2, 2]
    assert reduce_index(9, 3) == 2  # ceil(9 / 8)
    assert reduce_index(-9, 3) == -1
    assert reduce_index(7, 0) == 7


def test_reduce_index_equals_direct_index_for_every_schema_pair() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0, 6) for _ in range(1500)]
    values += [2.0 ** (rng.randint(-2000, 2000) / 256) for _ in range(500)]  # on boundaries
    for high in SCHEMAS:
        fine = [bucket_index(v, high) for v in values]
        for low in range(MIN_SCHEMA, high):
            coarse = [bucket_index(v, low) for v in values]
            assert [reduce_index(i, high - low) for i in fine] == coarse, (high, low)


@PROPERTY
@given(
    v=normal_floats,
    high=st.sampled_from(SCHEMAS),
    steps=st.integers(min_value=0, max_value=MAX_SCHEMA - MIN_SCHEMA),
)
def test_reduce_index_property(v: float, high: int, steps: int) -> None:
    low = max(high - steps, MIN_SCHEMA)
    assert reduce_index(bucket_index(v, high), high - low) == bucket_index(v, low)


def test_reduce_index_keeps_overflow_bucket_on_top() -> None:
    for high in SCHEMAS:
        for low in range(MIN_SCHEMA, high):
            assert reduce_index(overflow_index(high), high - low) == overflow_index(low)


def test_reduce_buckets() -> None:
    assert reduce_buckets({1: 2, 2: 3, 3: 1, -1: 4, 0: 1, 5: 0}, 1) == {1: 5, 2: 1, 0: 5}
    assert reduce_buckets({3: 1}, 0) == {3: 1}
    assert reduce_buckets({}, 4) == {}
    with pytest.raises(ValueError, match="steps"):
        reduce_buckets({1: 1}, -1)


def test_merge_of_workers_equals_histogram_of_all_observations() -> None:
    rng = random.Random(11)
    values = [rng.lognormvariate(math.log(50), 1.2) for _ in range(20000)]
    schemas = [3, 4, 3, 8, 5]
    workers: list[list[float]] = [[] for _ in schemas]
    for k, v in enumerate(values):
        workers[k % len(schemas)].append(v)
    parts = [(s, histogram(w, s)) for s, w in zip(schemas, workers)]
    schema, merged = merge_buckets(parts)
    assert schema == 3
    assert merged == histogram(values, 3)
    assert sum(merged.values()) == len(values)
    # Order and grouping do not matter.
    assert merge_buckets(reversed(parts)) == (schema, merged)
    assert merge_buckets([merge_buckets(parts[:2]), merge_buckets(parts[2:])]) == (3, merged)


@PROPERTY
@given(
    parts=st.lists(
        st.tuples(st.sampled_from(SCHEMAS), st.lists(normal_floats, max_size=30)),
        min_size=1,
        max_size=5,
    )
)
def test_merge_property(parts: list[tuple[int, list[float]]]) -> None:
    low = min(s for s, _ in parts)
    schema, merged = merge_buckets([(s, histogram(vs, s)) for s, vs in parts])
    assert schema == low
    assert merged == histogram([v for _, vs in parts for v in vs], low)


def test_merge_buckets_edge_cases() -> None:
    assert merge_buckets([(3, {})]) == (3, {})
    assert merge_buckets([(3, {1: 0, 2: 5})]) == (3, {2: 5})
    with pytest.raises(ValueError, match="at least one"):
        merge_buckets([])
    with pytest.raises(ValueError, match="schema"):
        merge_buckets([(3, {1: 1}), (12, {1: 1})])


# -- limits -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 5, 20, 160, 10_000])
def test_limit_buckets(limit: int) -> None:
    rng = random.Random(limit)
    values = [rng.lognormvariate(0, 5) for _ in range(5000)]
    original = histogram(values, 8)
    schema, limited = limit_buckets(8, original, limit)
    assert len(limited) <= limit or schema == MIN_SCHEMA
    assert limited == histogram(values, schema)
    assert sum(limited.values()) == len(values)
    if schema < 8:  # one step finer would not have fitted
        assert len(reduce_buckets(original, 8 - schema - 1)) > limit


def test_limit_buckets_stops_at_min_schema() -> None:
    values = [2.0**e for e in range(-1000, 1000, 37)]
    schema, limited = limit_buckets(0, histogram(values, 0), 1)
    assert schema == MIN_SCHEMA
    assert len(limited) > 1
    assert limit_buckets(5, {}, 1) == (5, {})


def test_limit_signed_buckets_counts_both_sides() -> None:
    pos = histogram([1.5, 3.0, 6.0, 12.0], 0)  # 4 buckets
    neg = histogram([1.5, 3.0], 0)  # 2 buckets
    schema, p, n = limit_signed_buckets(0, pos, neg, 4)
    assert len(p) + len(n) <= 4
    assert (schema, p, n) == (-1, histogram([1.5, 3.0, 6.0, 12.0], -1), histogram([1.5, 3.0], -1))
    assert limit_signed_buckets(0, pos, neg, 6) == (0, pos, neg)


# -- spans and deltas ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("buckets", "spans", "deltas"),
    [
        pytest.param({}, [], [], id="empty"),
        pytest.param({5: 0}, [], [], id="only-empty-buckets"),
        pytest.param({3: 7}, [(3, 1)], [7], id="one"),
        pytest.param({0: 1, 1: 3, 2: 2}, [(0, 3)], [1, 2, -1], id="contiguous"),
        pytest.param({0: 4, 2: 4}, [(0, 3)], [4, -4, 4], id="gap-1-filled"),
        pytest.param({0: 4, 3: 1}, [(0, 4)], [4, -4, 0, 1], id="gap-2-filled"),
        pytest.param({0: 4, 4: 1}, [(0, 1), (3, 1)], [4, -3], id="gap-3-new-span"),
        pytest.param({-10: 2, -9: 1, 7: 5}, [(-10, 2), (15, 1)], [2, -1, 4], id="negative-start"),
        pytest.param({-3: 1, -1: 1, 0: 0, 2: 1}, [(-3, 6)], [1, -1, 1, -1, 0, 1], id="zeros"),
        # The spec's example, with client_golang's gap rule.
        pytest.param(
            {-2: 3, -1: 5, 2: 1, 4: 3, 5: 2},
            [(-2, 8)],
            [3, 2, -5, 0, 1, -1, 3, -1],
            id="spec-example",
        ),
    ],
)
def test_to_spans_deltas(
    buckets: dict[int, int], spans: list[tuple[int, int]], deltas: list[int]
) -> None:
    assert to_spans_deltas(buckets) == (spans, deltas)
    assert decode_spans(spans, deltas) == {i: n for i, n in buckets.items() if n}


@PROPERTY
@given(
    st.dictionaries(
        st.integers(min_value=-3000, max_value=3000), st.integers(min_value=0, max_value=2**40)
    )
)
def test_spans_deltas_round_trip(buckets: dict[int, int]) -> None:
    spans, deltas = to_spans_deltas(buckets)
    populated = {i: n for i, n in buckets.items() if n}
    assert decode_spans(spans, deltas) == populated
    assert sum(length for _, length in spans) == len(deltas)
    assert all(length > 0 for _, length in spans)
    assert all(offset > 2 for offset, _ in spans[1:])  # small gaps never open a span
    if populated:
        assert spans[0][0] == min(populated)
    else:
        assert (spans, deltas) == ([], [])


def test_spans_of_a_sparse_latency_histogram_round_trip() -> None:
    rng = random.Random(3)
    buckets = histogram([rng.lognormvariate(math.log(40), 1.5) for _ in range(3000)], 3)
    buckets.update(histogram([rng.uniform(1e5, 1e6) for _ in range(5)], 3))  # far outliers
    spans, deltas = to_spans_deltas(buckets)
    assert len(spans) >= 2
    assert decode_spans(spans, deltas) == buckets


# -- zero bucket --------------------------------------------------------------------


def test_widen_zero_bucket() -> None:
    pos = {0: 1, 1: 2, 2: 4}  # schema 0: (0.5, 1], (1, 2], (2, 4]
    neg = {1: 8, 2: 16}
    threshold, moved, p, n = widen_zero_bucket(0, 1.5, pos, neg)
    # (1, 2] straddles 1.5: it moves whole and the threshold grows to 2, on both sides.
    assert (threshold, moved, p, n) == (2.0, 1 + 2 + 8, {2: 4}, {2: 16})
    assert widen_zero_bucket(0, 2.0, pos, neg) == (2.0, 11, {2: 4}, {2: 16})
    assert widen_zero_bucket(0, 0.25, pos, neg) == (0.25, 0, pos, neg)


def test_widen_zero_bucket_negative_side() -> None:
    # [-2, -1) straddles -1.5; [-8, -4) stays.
    assert widen_zero_bucket(0, 1.5, {}, {1: 1, 3: 1}) == (2.0, 1, {}, {3: 1})


def test_widen_zero_bucket_at_finer_schema() -> None:
    # Schema 3 buckets near 1; a threshold of 1.0 is a boundary, so nothing straddles.
    pos = histogram([0.95, 1.0, 1.01, 1.2], 3)
    threshold, moved, p, _ = widen_zero_bucket(3, 1.0, pos, {})
    assert (threshold, moved, p) == (1.0, 2, histogram([1.01, 1.2], 3))


# -- quantiles ----------------------------------------------------------------------


@pytest.mark.parametrize("schema", [0, 3, 5])
def test_quantile_within_one_bucket_of_exact(schema: int) -> None:
    rng = random.Random(schema)
    values = sorted(rng.lognormvariate(math.log(50), 1) for _ in range(20000))
    buckets = histogram(values, schema)
    growth = 2.0 ** (2.0**-schema)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        exact = values[math.ceil(q * len(values)) - 1]
        estimate = quantile(q, schema, buckets)
        assert exact / growth <= estimate <= exact * growth, (q, exact, estimate)


def test_quantile_edges() -> None:
    assert math.isnan(quantile(0.5, 3, {}))
    assert quantile(0.5, 0, {1: 1, 2: 1}) == pytest.approx(2.0)
    assert quantile(0.0, 0, {1: 2}) == 1.0
    assert quantile(1.0, 0, {1: 2}) == 2.0
    # Zero bucket only, no negatives: linear from 0.
    assert quantile(0.5, 3, {}, zero_count=4, zero_threshold=1.0) == 0.5
    # Negative buckets come first, most negative first.
    assert quantile(0.25, 0, {1: 1}, negative={2: 1, 1: 2}) < -1
    assert quantile(1.0, 0, {}, negative={1: 1}) == -1.0
    # The overflow bucket has no width to interpolate in.
    assert quantile(1.0, 3, {overflow_index(3): 1}) == MAX
    with pytest.raises(ValueError, match="q must be"):
        quantile(1.5, 3, {1: 1})
