"""The /prometheus protobuf body, decoded with the official protobuf runtime."""

from __future__ import annotations

from typing import Any

import pytest
from metrics_pb import parse_delimited
from werkzeug.test import Client

import sfmon
from sfmon import native

PROTO_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
    "encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PLAIN_PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


LATENCIES = {"/a": 3.0, "/b": 250.0}


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["sfmon.route"] = environ["PATH_INFO"]
    start_response("200 OK", [])
    return [b"x"]


def test_protobuf_only_when_asked_and_decodes(store_dir: str) -> None:
    m = sfmon.Monitor(app, namespace="pbx", access_log=False)
    c = Client(m)
    for path in ("/a", "/a", "/b"):
        c.get(path, buffered=True)
    h = sfmon.histogram("pbx_injected_ms", "known values", native=True, buckets=[1, 10, 100])
    for v in (0.5, 3.0, 3.0, 40.0, 2000.0):
        h.observe(v)

    plain = c.get(
        "/api/metrics/prometheus", headers={"Accept": PLAIN_PROMETHEUS_ACCEPT}, buffered=True
    )
    resp = c.get("/api/metrics/prometheus", headers={"Accept": PROTO_ACCEPT}, buffered=True)

    assert plain.headers["Content-Type"].startswith("application/openmetrics-text")
    assert resp.headers["Content-Type"].startswith("application/vnd.google.protobuf")
    families = {f.name: f for f in parse_delimited(resp.data)}
    assert "pbx_requests_total" in families and "sfmon_store_files" in families
    req = families["pbx_requests_total"]
    counts = {tuple((lp.name, lp.value) for lp in m.label): m.counter.value for m in req.metric}
    assert counts[(("method", "GET"), ("path", "/a"), ("status", "200"))] == 2
    assert req.metric[0].counter.HasField("created_timestamp")
    lat = families["pbx_request_latency_ms"]
    assert {m.histogram.sample_count for m in lat.metric} == {1, 2}
    assert all(m.histogram.schema == 3 and m.histogram.positive_span for m in lat.metric)
    inj = families["pbx_injected_ms"].metric[0].histogram
    assert inj.sample_count == 5 and inj.sample_sum == pytest.approx(2046.5, abs=1e-3)
    assert [(b.upper_bound, b.cumulative_count) for b in inj.bucket] == [
        (1.0, 1),
        (10.0, 3),
        (100.0, 4),
        (float("inf"), 5),
    ]
    decoded: dict[int, int] = {}
    index, count = 0, 0
    deltas = iter(inj.positive_delta)
    for span in inj.positive_span:
        index += span.offset
        for _ in range(span.length):
            count += next(deltas)
            if count:
                decoded[index] = count
            index += 1
    expected: dict[int, int] = {}
    for v in (0.5, 3.0, 3.0, 40.0, 2000.0):
        i = native.bucket_index(v, 3)
        expected[i] = expected.get(i, 0) + 1
    assert decoded == expected
    assert inj.zero_count == 0


def test_bucket_limit_reduces_the_schema_on_the_wire(store_dir: str) -> None:
    h = sfmon.histogram("pbx_wide_ms", "wide", native=True, native_max_buckets=10)
    for i in range(200):
        h.observe(1.05**i)
    m = sfmon.Monitor(app, namespace="pby", access_log=False)

    resp = Client(m).get(
        "/api/metrics/prometheus", headers={"Accept": PROTO_ACCEPT}, buffered=True
    )

    hist = {f.name: f for f in parse_delimited(resp.data)}["pbx_wide_ms"].metric[0].histogram
    populated = sum(1 for d in _counts(hist) if d)
    assert hist.schema < 3 and populated <= 10 and hist.sample_count == 200


def _counts(hist: Any) -> list[int]:
    out, count = [], 0
    for d in hist.positive_delta:
        count += d
        out.append(count)
    return out
