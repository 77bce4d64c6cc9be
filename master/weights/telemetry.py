"""Prometheus metrics of the epochs engine."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEIGHTS_EPOCH = Gauge("platform_weights_epoch", "Newest sealed epoch number.")
EPOCHS = Counter(
    "platform_epochs_total",
    "Epoch runs, by outcome (sealed, or why none was sealed).",
    ["outcome"],
)
EPOCH_SECONDS = Histogram(
    "platform_epoch_seconds",
    "Wall time of an epoch run, from the start of collection to the published vector.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CHALLENGE_RESULTS = Counter(
    "platform_epoch_challenge_results_total",
    "Per-challenge outcomes of sealed epochs, by slug, status and failure kind.",
    ["slug", "status", "failure"],
)
