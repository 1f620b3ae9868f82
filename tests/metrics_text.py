"""Reading the service's Prometheus text in tests, with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus exposition by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_value(samples: dict, name: str, *, required: bool = False, **labels: str) -> float:
    """One sample's value; a sample not exposed yet counts 0 (a counter never incremented), unless required."""
    key = (name, frozenset(labels.items()))
    if required and key not in samples:
        raise AssertionError(f"{name}{labels or ''} is not in the metrics: {sorted(k[0] for k in samples)}")
    return samples.get(key, 0.0)
