"""The agent's metrics.

One small HTTP server on ``--metrics-listen`` (``platform_common.metrics.MetricsServer``
with the agent's health check) answers ``/metrics`` (Prometheus) and ``/healthz`` (JSON;
200 while the agent runs, 503 once it is stopping or a part of it died), so a probe and a
scraper need one port. ``/healthz`` also says whether the streams are connected and
whether the agent holds a fresh vector, but those do not change its status: an agent cut
off from the master is alive and doing the right thing (submitting nothing once its
vector expires); alert on the metrics instead.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STREAM_CONNECTED = Gauge(
    "platform_validator_stream_connected",
    "1 while the stream to the master is open and has answered, by stream.",
    ["stream"],
)
STREAM_RECONNECTS = Counter(
    "platform_validator_stream_reconnects_total",
    "Streams to the master that ended and are reconnected, by stream and gRPC status.",
    ["stream", "code"],
)
STREAM_SNAPSHOTS = Counter(
    "platform_validator_stream_snapshots_total",
    "Snapshots received instead of a resumed stream, by stream and reason.",
    ["stream", "reason"],
)
STREAM_REVISION = Gauge(
    "platform_validator_stream_revision",
    "Position each stream resumes from (registry revision, weights epoch).",
    ["stream"],
)
CHALLENGE_INSTANCES = Gauge(
    "platform_validator_challenge_instances",
    "With --run-challenges: challenge instances this host runs, by state (RUNNING, "
    "STARTING, BACKOFF, FAILED, STOPPING).",
    ["state"],
)
VECTORS = Counter(
    "platform_validator_vectors_total",
    "Vectors received, by what became of them: queued, refused, duplicate.",
    ["result"],
)
REFUSALS = Counter(
    "platform_validator_vector_refusals_total",
    "Vectors not submitted, by the check they failed (signature, netuid, expired, ...).",
    ["check"],
)
OUTCOMES = Counter(
    "platform_validator_outcomes_total",
    "Final outcome of each epoch, as reported to the master.",
    ["outcome"],
)
SKIPPED = Counter(
    "platform_validator_skipped_total",
    "Epochs for which nothing was submitted, by reason (expired, not_newer, superseded, "
    "rate_limited, rejected, failed).",
    ["reason"],
)
VECTOR_EXPIRED = Gauge(
    "platform_validator_vector_expired",
    "1 when the newest vector received has expired and no fresh one is held: the agent "
    "submits nothing until the master publishes a new one.",
)
LATEST_EPOCH = Gauge("platform_validator_latest_epoch", "Newest authentic epoch received.")
LATEST_EXPIRY = Gauge(
    "platform_validator_latest_expire_timestamp_seconds",
    "expire_time of the newest authentic vector received (Unix seconds).",
)
SUBMITTED_EPOCH = Gauge(
    "platform_validator_submitted_epoch", "Newest epoch submitted (or committed) on chain."
)
RATE_LIMIT_WAIT = Gauge(
    "platform_validator_rate_limit_next_block",
    "While a submission waits for the weights rate limit: the block it waits for; else 0.",
)
SUBMIT_SECONDS = Histogram(
    "platform_validator_submit_seconds",
    "Time from claiming an epoch to its final outcome, waits for the rate limit included.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
REPORTS = Counter(
    "platform_validator_reports_total",
    "Delivery attempts of submission reports, by result (sent, duplicate, dropped, retry).",
    ["result"],
)
REPORTS_QUEUED = Gauge(
    "platform_validator_reports_queued", "Submission reports not yet acknowledged by the master."
)
REGISTRY_CHALLENGES = Gauge(
    "platform_validator_registry_challenges",
    "Challenges in the registry as streamed, by status.",
    ["status"],
)
