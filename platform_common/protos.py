"""Conversions between Python values and the small messages the contracts share."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from platform_network.v1 import common_pb2

#: A metadata value: what ``common.ScalarValue`` holds.
Scalar = str | int | float | bool


def duration(seconds: float) -> Duration:
    """``seconds`` (clamped at 0) as a Duration, to the nanosecond."""
    value = Duration()
    value.FromNanoseconds(max(0, round(seconds * 1e9)))
    return value


def scalar_to_proto(value: Scalar) -> common_pb2.ScalarValue:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return common_pb2.ScalarValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.ScalarValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.ScalarValue(double_value=value)
    return common_pb2.ScalarValue(string_value=value)


def scalar_from_proto(value: common_pb2.ScalarValue) -> Scalar:
    kind = value.WhichOneof("kind")
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    return value.string_value
