"""The hand-written protobuf exposition, decoded by the official protobuf runtime."""

from __future__ import annotations

import doctest
import math
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metrics_pb import MetricFamily, MetricType, parse_delimited

from sfmon import protobuf
from sfmon.native import DEFAULT_ZERO_THRESHOLD, bucket_index, to_spans_deltas
from sfmon.protobuf import (
    CONTENT_TYPE,
    HistogramData,
    encode_counter_family,
    encode_gauge_family,
    encode_histogram_family,
    encode_untyped_family,
    negotiate,
)

INF = math.inf
CLASSIC = [(5.0, 1), (10.0, 4), (50.0, 9), (INF, 10)]


def only(data: bytes) -> Any:
    families = list(parse_delimited(data))
    assert len(families) == 1
    return families[0]


def labels_of(metric: Any) -> list[tuple[str, str]]:
    return [(pair.name, pair.value) for pair in metric.label]


def native_buckets(spans: Any, deltas: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    it = iter(deltas)
    index = count = 0
    for n, span in enumerate(spans):
        index = span.offset if n == 0 else index + span.offset
        for _ in range(span.length):
            count += next(it)
            if count:
                out[index] = count
            index += 1
    assert next(it, None) is None
    return out


def official(family: Any) -> bytes:
    body = family.SerializeToString()
    assert len(body) < 128
    return bytes([len(body)]) + body


def test_docstring_examples() -> None:
    assert doctest.testmod(protobuf).failed == 0


def test_content_type() -> None:
    assert CONTENT_TYPE == (
        "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; "
        "encoding=delimited"
    )


# -- counters, gauges, untyped ------------------------------------------------------


def test_counter_family() -> None:
    data = encode_counter_family(
        "softfactory_requests_total",
        "Completed requests",
        [
            ((("method", "GET"), ("path", "/"), ("status", "200")), 41.0, 1700000000.5),
            ((("method", "POST"), ("path", "/pay"), ("status", "502")), 2.0, None),
        ],
    )
    family = only(data)
    assert family.name == "softfactory_requests_total"
    assert family.help == "Completed requests"
    assert family.type == MetricType.values_by_name["COUNTER"].number == 0
    assert not family.HasField("unit")
    first, second = family.metric
    assert labels_of(first) == [("method", "GET"), ("path", "/"), ("status", "200")]
    assert first.counter.value == 41.0
    assert first.counter.created_timestamp.seconds == 1700000000
    assert first.counter.created_timestamp.nanos == 500_000_000
    assert not first.HasField("gauge") and not first.HasField("histogram")
    assert labels_of(second) == [("method", "POST"), ("path", "/pay"), ("status", "502")]
    assert second.counter.value == 2.0
    assert second.counter.HasField("value")
    assert not second.counter.HasField("created_timestamp")


def test_counter_bytes_equal_official_serialisation() -> None:
    # Same fields, same order: byte for byte what the protobuf library writes.
    data = encode_counter_family("a_total", "h", [((("k", "v"),), 0.0, 12.25)])
    family = MetricFamily(name="a_total", help="h", type=0)
    metric = family.metric.add()
    metric.label.add(name="k", value="v")
    metric.counter.value = 0.0
    metric.counter.created_timestamp.seconds = 12
    metric.counter.created_timestamp.nanos = 250_000_000
    assert data == official(family)


def test_gauge_family() -> None:
    data = encode_gauge_family(
        "softfactory_memory_rss_mb", "RSS", [((), 123.5), ((("worker", "2"),), -1.0)]
    )
    family = only(data)
    assert family.type == MetricType.values_by_name["GAUGE"].number
    assert [m.gauge.value for m in family.metric] == [123.5, -1.0]
    assert labels_of(family.metric[0]) == []
    assert labels_of(family.metric[1]) == [("worker", "2")]
    expected = MetricFamily(name="softfactory_memory_rss_mb", help="RSS", type=1)
    expected.metric.add().gauge.value = 123.5
    m = expected.metric.add()
    m.label.add(name="worker", value="2")
    m.gauge.value = -1.0
    assert data == official(expected)


def test_untyped_family() -> None:
    family = only(encode_untyped_family("x", "", [((("a", "b"),), 7.0)]))
    assert family.type == MetricType.values_by_name["UNTYPED"].number
    assert family.metric[0].untyped.value == 7.0
    assert family.help == ""


@pytest.mark.parametrize("value", [0.0, -0.0, 1e308, INF, -INF, 5e-324])
def test_special_values(value: float) -> None:
    family = only(encode_gauge_family("g", "", [((), value)]))
    assert struct.pack("<d", family.metric[0].gauge.value) == struct.pack("<d", value)
    nan = only(encode_gauge_family("g", "", [((), math.nan)]))
    assert math.isnan(nan.metric[0].gauge.value)


def test_unicode_labels_and_help() -> None:
    pairs = (("path", "/café/☕"), ("user", "Ωmega 𝄞"), ("empty", ""))
    family = only(encode_counter_family("c_total", "Hilfe – ✓", [(pairs, 1.0, None)]))
    assert family.help == "Hilfe – ✓"
    assert labels_of(family.metric[0]) == list(pairs)


def test_lone_surrogate_is_replaced_not_fatal() -> None:
    family = only(encode_gauge_family("g", "", [((("path", "/a\udcff"),), 1.0)]))
    assert labels_of(family.metric[0]) == [("path", "/a?")]


def test_labels_keep_the_given_order() -> None:
    family = only(encode_gauge_family("g", "", [((("z", "1"), ("a", "2")), 1.0)]))
    assert labels_of(family.metric[0]) == [("z", "1"), ("a", "2")]


def test_empty_family_encodes_to_nothing() -> None:
    assert encode_counter_family("c_total", "h", []) == b""
    assert encode_gauge_family("g", "h", []) == b""
    assert encode_histogram_family("h", "h", []) == b""


def test_unit() -> None:
    family = only(encode_gauge_family("uptime_seconds", "", [((), 1.0)], unit="seconds"))
    assert family.unit == "seconds"


@pytest.mark.parametrize(
    ("created", "seconds", "nanos"),
    [
        (1700000000.0, 1700000000, 0),
        (1700000000.123456, 1700000000, 123456001),  # float rounding of the fraction
        (0.999999999999, 1, 0),  # rounds up into the next second
        (0.0, 0, 0),
    ],
)
def test_created_timestamp(created: float, seconds: int, nanos: int) -> None:
    family = only(encode_counter_family("c_total", "", [((), 1.0, created)]))
    ts = family.metric[0].counter.created_timestamp
    assert family.metric[0].counter.HasField("created_timestamp")
    assert (ts.seconds, ts.nanos) == (seconds, pytest.approx(nanos, abs=1000))


@pytest.mark.parametrize("created", [math.nan, INF])
def test_non_finite_created_is_left_out(created: float) -> None:
    family = only(encode_counter_family("c_total", "", [((), 1.0, created)]))
    assert not family.metric[0].counter.HasField("created_timestamp")


# -- histograms ---------------------------------------------------------------------


def test_classic_only_histogram() -> None:
    h = HistogramData(labels=(("path", "/"),), count=10, sum=123.5, buckets=CLASSIC)
    family = only(encode_histogram_family("lat_ms", "Latency", [h]))
    assert family.type == MetricType.values_by_name["HISTOGRAM"].number
    hist = family.metric[0].histogram
    assert (hist.sample_count, hist.sample_sum) == (10, 123.5)
    assert [(b.upper_bound, b.cumulative_count) for b in hist.bucket] == CLASSIC
    # No native field at all: a scraper must see a plain classic histogram.
    for name in ("schema", "zero_threshold", "zero_count", "created_timestamp"):
        assert not hist.HasField(name), name
    assert not hist.positive_span and not hist.negative_span
    assert not hist.positive_delta and not hist.negative_delta


def test_native_only_histogram() -> None:
    rng = random.Random(5)
    values = [rng.lognormvariate(math.log(40), 1.0) for _ in range(2000)]
    positive: dict[int, int] = {}
    for v in values:
        i = bucket_index(v, 3)
        positive[i] = positive.get(i, 0) + 1
    h = HistogramData(
        labels=(),
        count=len(values) + 3,
        sum=sum(values),
        schema=3,
        zero_count=3,
        positive=positive,
        created=1700000000.0,
    )
    hist = only(encode_histogram_family("lat_ms", "", [h])).metric[0].histogram
    assert hist.sample_count == 2003
    assert hist.sample_sum == pytest.approx(sum(values))
    assert not hist.bucket
    assert hist.HasField("schema") and hist.schema == 3
    assert hist.zero_threshold == DEFAULT_ZERO_THRESHOLD
    assert hist.zero_count == 3
    assert native_buckets(hist.positive_span, hist.positive_delta) == positive
    spans, deltas = to_spans_deltas(positive)
    assert [(s.offset, s.length) for s in hist.positive_span] == spans
    assert list(hist.positive_delta) == deltas
    assert not hist.negative_span and not hist.negative_delta
    assert hist.created_timestamp.seconds == 1700000000


def test_classic_and_native_in_one_message() -> None:
    h = HistogramData(
        labels=(("method", "GET"), ("path", "/")),
        count=10,
        sum=190.0,
        buckets=CLASSIC,
        schema=0,
        zero_threshold=0.0,
        zero_count=0,
        positive={3: 1, 4: 3, 6: 5, 7: 1},
        created=1.5,
    )
    family = only(encode_histogram_family("lat_ms", "Latency", [h]))
    assert len(family.metric) == 1
    hist = family.metric[0].histogram
    assert [(b.upper_bound, b.cumulative_count) for b in hist.bucket] == CLASSIC
    assert hist.schema == 0 and hist.HasField("zero_threshold") and hist.zero_threshold == 0.0
    assert native_buckets(hist.positive_span, hist.positive_delta) == h.positive
    assert (hist.created_timestamp.seconds, hist.created_timestamp.nanos) == (1, 500_000_000)


@pytest.mark.parametrize("zero_threshold", [0.0, DEFAULT_ZERO_THRESHOLD])
@pytest.mark.parametrize("zero_count", [0, 4])
def test_native_without_buckets_has_the_noop_span(zero_threshold: float, zero_count: int) -> None:
    h = HistogramData(
        labels=(),
        count=zero_count,
        sum=0.0,
        buckets=[(INF, zero_count)],
        schema=3,
        zero_threshold=zero_threshold,
        zero_count=zero_count,
    )
    hist = only(encode_histogram_family("h", "", [h])).metric[0].histogram
    assert len(hist.positive_span) == 1
    span = hist.positive_span[0]
    assert span.HasField("offset") and span.HasField("length")
    assert (span.offset, span.length) == (0, 0)
    assert not hist.positive_delta and not hist.negative_span
    assert hist.zero_count == zero_count


def test_negative_buckets() -> None:
    h = HistogramData(
        labels=(),
        count=7,
        sum=-3.0,
        schema=-4,
        zero_count=1,
        positive={1: 2},
        negative={-2: 1, 0: 2, 5: 1},
    )
    hist = only(encode_histogram_family("h", "", [h])).metric[0].histogram
    assert hist.schema == -4
    assert native_buckets(hist.negative_span, hist.negative_delta) == {-2: 1, 0: 2, 5: 1}
    assert native_buckets(hist.positive_span, hist.positive_delta) == {1: 2}


def test_only_negative_buckets_need_no_noop_span() -> None:
    h = HistogramData(labels=(), count=1, sum=-2.0, schema=3, negative={8: 1})
    hist = only(encode_histogram_family("h", "", [h])).metric[0].histogram
    assert not hist.positive_span
    assert native_buckets(hist.negative_span, hist.negative_delta) == {8: 1}


def test_big_counts_and_extreme_indices() -> None:
    big = 2**53 + 1
    h = HistogramData(
        labels=(),
        count=2 * big + 1,
        sum=1e300,
        buckets=[(1e-300, 1), (INF, 2 * big + 1)],
        schema=8,
        positive={-262000: big, 262145: 1, 262144: big},
    )
    hist = only(encode_histogram_family("h", "", [h])).metric[0].histogram
    assert hist.sample_count == 2 * big + 1
    assert native_buckets(hist.positive_span, hist.positive_delta) == h.positive
    assert hist.bucket[0].upper_bound == 1e-300


@pytest.mark.parametrize(
    "n", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**35, 2**63, 2**64 - 1]
)
def test_varint_lengths(n: int) -> None:
    h = HistogramData(labels=(), count=n, sum=0.0, buckets=[(1.0, n), (INF, n)])
    hist = only(encode_histogram_family("h", "", [h])).metric[0].histogram
    assert hist.sample_count == n
    assert [b.cumulative_count for b in hist.bucket] == [n, n]
    if n < 2**62:  # a delta is an int64
        h = HistogramData(labels=(), count=n, sum=0.0, schema=0, positive={-5: n, 7: 1})
        hist = only(encode_histogram_family("h", "", [h])).metric[0].histogram
        assert native_buckets(hist.positive_span, hist.positive_delta) == {
            i: c for i, c in {-5: n, 7: 1}.items() if c
        }


def test_histogram_data_is_positional_and_immutable() -> None:
    h = HistogramData((("a", "b"),), 2, 3.5, [(INF, 2)], 3, 0.0, 1, {0: 1}, None, 9.0)
    assert (h.schema, h.zero_count, h.positive, h.created) == (3, 1, {0: 1}, 9.0)
    with pytest.raises(AttributeError):
        h.count = 5  # type: ignore[misc]


def test_many_series_and_families_in_one_stream() -> None:
    series = [
        HistogramData(
            labels=(("path", f"/p{k}"), ("method", "GET")),
            count=k,
            sum=float(k),
            buckets=[(1.0, 0), (INF, k)],
            schema=3,
            positive={k: k} if k else {},
            created=1000.0 + k,
        )
        for k in range(50)
    ]
    stream = b"".join(
        [
            encode_gauge_family("softfactory_up", "1 if healthy", [((), 1.0)]),
            encode_counter_family("softfactory_requests_total", "Requests", [((), 5.0, None)]),
            encode_histogram_family("softfactory_request_latency_ms", "Latency", series),
            encode_gauge_family("softfactory_database_users", "Users", [((), 12.0)]),
        ]
    )
    families = list(parse_delimited(stream))
    assert [f.name for f in families] == [
        "softfactory_up",
        "softfactory_requests_total",
        "softfactory_request_latency_ms",
        "softfactory_database_users",
    ]
    assert [f.type for f in families] == [1, 0, 4, 1]
    hist = families[2]
    assert len(hist.metric) == 50
    for k, metric in enumerate(hist.metric):
        assert labels_of(metric) == [("path", f"/p{k}"), ("method", "GET")]
        assert metric.histogram.sample_count == k
        assert metric.histogram.created_timestamp.seconds == 1000 + k
        got = native_buckets(metric.histogram.positive_span, metric.histogram.positive_delta)
        assert got == ({k: k} if k else {})


@settings(database=None, deadline=None, max_examples=200)
@given(
    labels=st.lists(st.tuples(st.text(min_size=1), st.text()), max_size=4),
    count=st.integers(min_value=0, max_value=2**64 - 1),
    total=st.floats(allow_nan=False),
    schema=st.integers(min_value=-4, max_value=8),
    zero_threshold=st.floats(min_value=0, max_value=1e300),
    positive=st.dictionaries(
        st.integers(min_value=-(2**20), max_value=2**20), st.integers(0, 2**62), max_size=40
    ),
    negative=st.dictionaries(
        st.integers(min_value=-(2**20), max_value=2**20), st.integers(0, 2**62), max_size=10
    ),
    created=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),
)
def test_histogram_round_trip_property(
    labels: list[tuple[str, str]],
    count: int,
    total: float,
    schema: int,
    zero_threshold: float,
    positive: dict[int, int],
    negative: dict[int, int],
    created: float | None,
) -> None:
    # Strings that are not valid UTF-8 (lone surrogates) are replaced; skip them here.
    for name, value in labels:
        for s in (name, value):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
                return
    h = HistogramData(
        labels=labels,
        count=count,
        sum=total,
        schema=schema,
        zero_threshold=zero_threshold,
        positive=positive,
        negative=negative,
        created=created,
    )
    metric = only(encode_histogram_family("h", "", [h])).metric[0]
    hist = metric.histogram
    assert labels_of(metric) == labels
    assert (hist.sample_count, hist.sample_sum, hist.schema) == (count, total, schema)
    assert hist.zero_threshold == zero_threshold
    assert native_buckets(hist.positive_span, hist.positive_delta) == {
        i: n for i, n in positive.items() if n
    }
    assert native_buckets(hist.negative_span, hist.negative_delta) == {
        i: n for i, n in negative.items() if n
    }
    assert hist.HasField("created_timestamp") == (created is not None)
    if created is not None:
        ts = hist.created_timestamp
        assert ts.seconds + ts.nanos / 1e9 == pytest.approx(created, abs=1e-6)


# -- negotiation --------------------------------------------------------------------

# Verified on Debian's Prometheus 2.42 (research §3.7).
PROM_NO_FLAG = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROM_NATIVE = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
    "encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,"
    "application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
# Prometheus 3.x shapes: weighted ranges, escaping parameters.
PROM3_DEFAULT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)
PROM3_NATIVE = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
    "encoding=delimited;escaping=allow-utf-8;q=0.6," + PROM3_DEFAULT
)
PROTO = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        pytest.param(None, "text", id="no-header"),
        pytest.param("", "text", id="empty"),
        pytest.param("*/*", "text", id="curl"),
        pytest.param(PROM_NO_FLAG, "openmetrics", id="prometheus-2.42"),
        pytest.param(PROM_NATIVE, "protobuf", id="prometheus-2.42-native-histograms"),
        pytest.param(PROM3_DEFAULT, "openmetrics", id="prometheus-3"),
        pytest.param(PROM3_NATIVE, "protobuf", id="prometheus-3-native-histograms"),
        pytest.param(PROTO, "protobuf", id="protobuf-alone"),
        pytest.param(CONTENT_TYPE, "protobuf", id="our-content-type"),
        pytest.param(
            'application/vnd.google.protobuf; proto="io.prometheus.client.MetricFamily"; '
            'encoding="delimited"',
            "protobuf",
            id="quoted-params",
        ),
        pytest.param(
            "Application/Vnd.Google.Protobuf; PROTO=io.prometheus.client.MetricFamily; "
            "Encoding=delimited",
            "protobuf",
            id="case-insensitive-names",
        ),
        pytest.param("application/vnd.google.protobuf", "text", id="protobuf-without-params"),
        pytest.param(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily",
            "text",
            id="protobuf-without-encoding",
        ),
        pytest.param(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=text",
            "text",
            id="protobuf-text-encoding",
        ),
        pytest.param(
            "application/vnd.google.protobuf;proto=other.Message;encoding=delimited",
            "text",
            id="protobuf-other-message",
        ),
        pytest.param(PROTO + ";q=0,*/*;q=0.1", "text", id="protobuf-refused"),
        pytest.param(PROTO + ";q=0.2," + PROM_NO_FLAG, "openmetrics", id="protobuf-weighed-low"),
        pytest.param(PROTO + ";q=abc", "text", id="protobuf-bad-q"),
        pytest.param("application/openmetrics-text", "openmetrics", id="om-no-version"),
        pytest.param("application/openmetrics-text;version=0.0.1", "openmetrics", id="om-0.0.1"),
        pytest.param("application/openmetrics-text;version=2.0.0", "text", id="om-2-not-served"),
        pytest.param(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4",
            "text",
            id="text-preferred",
        ),
        pytest.param(
            "text/plain;q=0.5,application/openmetrics-text;q=0.5", "text", id="tie-first-wins"
        ),
        pytest.param(
            "application/openmetrics-text;q=0.5,text/plain;q=0.5", "openmetrics", id="tie-om-first"
        ),
        pytest.param("*/*,application/openmetrics-text", "openmetrics", id="explicit-beats-wild"),
        pytest.param("text/plain;q=0,*/*", "openmetrics", id="text-excluded"),
        pytest.param("text/plain;version=0.0.4", "text", id="text-0.0.4"),
        pytest.param("text/*", "text", id="text-wildcard"),
        pytest.param("application/*", "openmetrics", id="application-wildcard"),
        pytest.param("application/json", "text", id="unservable"),
        pytest.param(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "text",
            id="browser",
        ),
        pytest.param(",;,  ;q=1, garbage", "text", id="garbage"),
    ],
)
def test_negotiate(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected


@settings(database=None, deadline=None)
@given(st.text())
def test_negotiate_never_fails_and_never_guesses_protobuf(accept: str) -> None:
    result = negotiate(accept)
    assert result in ("text", "openmetrics", "protobuf")
    if result == "protobuf":
        assert "io.prometheus.client.MetricFamily" in accept
