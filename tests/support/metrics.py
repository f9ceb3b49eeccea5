"""Reading a real worker's Prometheus endpoint in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker import RunningWorker

__all__ = ["Samples", "scrape", "value"]

Samples = dict[tuple[str, tuple], float]


def scrape(worker: RunningWorker) -> Samples:
    """Every sample of one scrape, keyed by (name, sorted labels)."""
    address = worker.wait_for_log(r"metrics on (http://\S+/metrics)").group(1)
    with urllib.request.urlopen(address, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
