"""Reading a gateway's /metrics in tests, through prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and labels, and every family's type."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels``, or None when absent."""
        return self.samples.get((name, frozenset(labels.items())))

    def get(self, name: str, **labels: str) -> float:
        """Like ``value``, but 0 when absent (a counter never incremented)."""
        found = self.value(name, **labels)
        return 0.0 if found is None else found

    def matching(self, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return {
            key: value
            for (sample, key), value in self.samples.items()
            if sample == name and wanted <= key
        }


def parse(text: str) -> Scrape:
    """Parse exposition text (fails on anything the official parser rejects)."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return Scrape(samples, types)


def scrape(base_url: str) -> Scrape:
    """GET ``base_url``/metrics and parse it."""
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)
