"""The official ``io.prometheus.client`` messages, built at run time for decoding in tests.

The descriptor mirrors prometheus/client_model ``io/prometheus/client/metrics.proto``
(proto2, the version with native histograms and created timestamps), field for field,
so no ``protoc`` and no generated code are needed. Test-only: sfmon encodes by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.internal.decoder import _DecodeVarint32

__all__ = ["MetricFamily", "MetricType", "parse_delimited"]

_F = descriptor_pb2.FieldDescriptorProto
OPTIONAL, REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
DOUBLE, UINT64, INT64, SINT32, SINT64, UINT32 = (
    _F.TYPE_DOUBLE,
    _F.TYPE_UINT64,
    _F.TYPE_INT64,
    _F.TYPE_SINT32,
    _F.TYPE_SINT64,
    _F.TYPE_UINT32,
)
STRING, MESSAGE, ENUM = _F.TYPE_STRING, _F.TYPE_MESSAGE, _F.TYPE_ENUM

# (message, [(field name, number, label, type, type name for messages/enums)])
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    ("LabelPair", [("name", 1, OPTIONAL, STRING, ""), ("value", 2, OPTIONAL, STRING, "")]),
    ("Gauge", [("value", 1, OPTIONAL, DOUBLE, "")]),
    (
        "Counter",
        [
            ("value", 1, OPTIONAL, DOUBLE, ""),
            ("exemplar", 2, OPTIONAL, MESSAGE, ".io.prometheus.client.Exemplar"),
            ("created_timestamp", 3, OPTIONAL, MESSAGE, ".google.protobuf.Timestamp"),
        ],
    ),
    ("Quantile", [("quantile", 1, OPTIONAL, DOUBLE, ""), ("value", 2, OPTIONAL, DOUBLE, "")]),
    (
        "Summary",
        [
            ("sample_count", 1, OPTIONAL, UINT64, ""),
            ("sample_sum", 2, OPTIONAL, DOUBLE, ""),
            ("quantile", 3, REPEATED, MESSAGE, ".io.prometheus.client.Quantile"),
            ("created_timestamp", 4, OPTIONAL, MESSAGE, ".google.protobuf.Timestamp"),
        ],
    ),
    ("Untyped", [("value", 1, OPTIONAL, DOUBLE, "")]),
    (
        "Histogram",
        [
            ("sample_count", 1, OPTIONAL, UINT64, ""),
            ("sample_count_float", 4, OPTIONAL, DOUBLE, ""),
            ("sample_sum", 2, OPTIONAL, DOUBLE, ""),
            ("bucket", 3, REPEATED, MESSAGE, ".io.prometheus.client.Bucket"),
            ("created_timestamp", 15, OPTIONAL, MESSAGE, ".google.protobuf.Timestamp"),
            ("schema", 5, OPTIONAL, SINT32, ""),
            ("zero_threshold", 6, OPTIONAL, DOUBLE, ""),
            ("zero_count", 7, OPTIONAL, UINT64, ""),
            ("zero_count_float", 8, OPTIONAL, DOUBLE, ""),
            ("negative_span", 9, REPEATED, MESSAGE, ".io.prometheus.client.BucketSpan"),
            ("negative_delta", 10, REPEATED, SINT64, ""),
            ("negative_count", 11, REPEATED, DOUBLE, ""),
            ("positive_span", 12, REPEATED, MESSAGE, ".io.prometheus.client.BucketSpan"),
            ("positive_delta", 13, REPEATED, SINT64, ""),
            ("positive_count", 14, REPEATED, DOUBLE, ""),
            ("exemplars", 16, REPEATED, MESSAGE, ".io.prometheus.client.Exemplar"),
        ],
    ),
    (
        "Bucket",
        [
            ("cumulative_count", 1, OPTIONAL, UINT64, ""),
            ("cumulative_count_float", 4, OPTIONAL, DOUBLE, ""),
            ("upper_bound", 2, OPTIONAL, DOUBLE, ""),
            ("exemplar", 3, OPTIONAL, MESSAGE, ".io.prometheus.client.Exemplar"),
        ],
    ),
    ("BucketSpan", [("offset", 1, OPTIONAL, SINT32, ""), ("length", 2, OPTIONAL, UINT32, "")]),
    (
        "Exemplar",
        [
            ("label", 1, REPEATED, MESSAGE, ".io.prometheus.client.LabelPair"),
            ("value", 2, OPTIONAL, DOUBLE, ""),
            ("timestamp", 3, OPTIONAL, MESSAGE, ".google.protobuf.Timestamp"),
        ],
    ),
    (
        "Metric",
        [
            ("label", 1, REPEATED, MESSAGE, ".io.prometheus.client.LabelPair"),
            ("gauge", 2, OPTIONAL, MESSAGE, ".io.prometheus.client.Gauge"),
            ("counter", 3, OPTIONAL, MESSAGE, ".io.prometheus.client.Counter"),
            ("summary", 4, OPTIONAL, MESSAGE, ".io.prometheus.client.Summary"),
            ("untyped", 5, OPTIONAL, MESSAGE, ".io.prometheus.client.Untyped"),
            ("histogram", 7, OPTIONAL, MESSAGE, ".io.prometheus.client.Histogram"),
            ("timestamp_ms", 6, OPTIONAL, INT64, ""),
        ],
    ),
    (
        "MetricFamily",
        [
            ("name", 1, OPTIONAL, STRING, ""),
            ("help", 2, OPTIONAL, STRING, ""),
            ("type", 3, OPTIONAL, ENUM, ".io.prometheus.client.MetricType"),
            ("metric", 4, REPEATED, MESSAGE, ".io.prometheus.client.Metric"),
            ("unit", 5, OPTIONAL, STRING, ""),
        ],
    ),
]
_METRIC_TYPES = ["COUNTER", "GAUGE", "SUMMARY", "UNTYPED", "HISTOGRAM", "GAUGE_HISTOGRAM"]


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="io/prometheus/client/metrics.proto",
        package="io.prometheus.client",
        syntax="proto2",
        dependency=["google/protobuf/timestamp.proto"],
    )
    enum = f.enum_type.add(name="MetricType")
    for number, name in enumerate(_METRIC_TYPES):
        enum.value.add(name=name, number=number)
    for message, fields in _MESSAGES:
        m = f.message_type.add(name=message)
        for name, number, label, type_, type_name in fields:
            field = m.field.add(name=name, number=number, label=label, type=type_)
            if type_name:
                field.type_name = type_name
    return f


def _build() -> tuple[Any, Any]:
    # A private pool: the default one may already hold another metrics.proto.
    pool = descriptor_pool.DescriptorPool()
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool.Add(timestamp)
    pool.Add(_file())
    family = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("io.prometheus.client.MetricFamily")
    )
    return family, pool.FindEnumTypeByName("io.prometheus.client.MetricType")


MetricFamily, MetricType = _build()


def parse_delimited(data: bytes) -> Iterator[Any]:
    """Yield each ``MetricFamily`` of a delimited stream (varint length + message)."""
    pos = 0
    while pos < len(data):
        size, pos = _DecodeVarint32(data, pos)
        family = MetricFamily()
        family.ParseFromString(data[pos : pos + size])
        pos += size
        yield family
    assert pos == len(data), "stream ends inside a message"
