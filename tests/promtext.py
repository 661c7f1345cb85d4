"""Reading Prometheus text (what GET /metrics serves) in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: str, name: str) -> list[Sample]:
    """Every sample called ``name`` in ``text``, whatever its labels."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` in ``text``; None when there is none."""
    return next((float(s.value) for s in samples(text, name) if s.labels == labels), None)
