"""Prometheus metrics of the edge: the xDS server and ext_authz."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

XDS_STREAMS = Gauge("platform_xds_streams", "Envoy ADS streams connected to this master.")
XDS_PUSHES = Counter(
    "platform_xds_pushes_total",
    "DiscoveryResponses sent to Envoys, by resource type (cluster, endpoint, listener, route).",
    ["type"],
)
XDS_ACKS = Counter(
    "platform_xds_acks_total", "Responses Envoys accepted, by resource type.", ["type"]
)
XDS_NACKS = Counter(
    "platform_xds_nacks_total",
    "Responses Envoys rejected (error_detail set), by resource type. The last good config "
    "stays in force; the rejected version is not pushed again.",
    ["type"],
)
XDS_SNAPSHOT_VERSION = Gauge(
    "platform_xds_snapshot_info",
    "The edge config being served; the version label is a hash of its content.",
    ["version"],
)
XDS_SNAPSHOTS = Counter(
    "platform_xds_snapshots_total", "Edge configurations built from the registry."
)
AUTHZ_CHECKS = Counter(
    "platform_authz_checks_total",
    "Miner requests checked by ext_authz, by decision (ok, or the refusal reason).",
    ["decision"],
)
AUTHZ_SECONDS = Histogram(
    "platform_authz_seconds",
    "Time to decide one ext_authz check.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
