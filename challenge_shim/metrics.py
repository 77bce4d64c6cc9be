"""Prometheus metrics of the shim (beyond the per-method call counts of CallGuard)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CHALLENGE_CALLS = Counter(
    "platform_shim_challenge_calls_total",
    "Calls forwarded to the challenge, by ChallengeInternal method and outcome "
    "(ok, refused, not_serving, unavailable, deadline_exceeded, challenge_error, internal).",
    ["method", "outcome"],
)
CHALLENGE_LATENCY = Histogram(
    "platform_shim_challenge_call_seconds",
    "Time the challenge took to answer a forwarded call, by method.",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WEIGHTS_REFUSALS = Counter(
    "platform_shim_weights_refusals_total",
    "GetWeights answers refused by validation, by rule "
    "(size, shape, hotkey, duplicate, score, label).",
    ["rule"],
)
BROKER_CALLS = Counter(
    "platform_shim_broker_calls_total",
    "Broker calls forwarded through the broker door, by method and status code.",
    ["method", "code"],
)
