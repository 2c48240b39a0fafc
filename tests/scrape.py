"""GET /metrics as a Prometheus server reads it: prometheus-client's own text parser, samples by name and
labels."""

from __future__ import annotations

from collections.abc import Mapping

import requests
from prometheus_client.parser import text_string_to_metric_families


class Samples:
    """The samples of one scrape, and the type of each family."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self._values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self._values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels``, or None."""
        return self._values.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels`` (0 when absent: a counter nothing has counted yet)."""
        return self.get(name, **labels) or 0.0

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample ``name``, by its labels."""
        return {labels: v for (n, labels), v in self._values.items() if n == name}


def scrape(base_url: str, headers: Mapping[str, str] | None = None) -> Samples:
    rsp = requests.get(f"{base_url}/metrics", headers=dict(headers or {}), timeout=30)
    assert rsp.status_code == 200, (rsp.status_code, rsp.text[:500])
    assert rsp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Samples(rsp.text)
