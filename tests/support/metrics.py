"""Reading a process's Prometheus ``/metrics`` endpoint, with prometheus_client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample called ``name`` served on 127.0.0.1:``port``."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def value(port: int, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry ``labels``; 0 when there are none."""
    return sum(
        v for found, v in samples(port, name) if all(found.get(k) == x for k, x in labels.items())
    )
