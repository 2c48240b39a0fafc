"""core.metrics: what counts never fails what it counts, and a timed block is observed even when it raises."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Histogram

from core import metrics
from core.metrics import INSTANCES_RECEIVED, REGISTRY, count, count_instance, timed

REFUSED = {"protocol": "dimse", "status": "0xA700"}


def test_counting_never_raises(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    before = REGISTRY.get_sample_value("gateway_instances_received_total", REFUSED) or 0
    count_instance("dimse", 0xA700)
    assert REGISTRY.get_sample_value("gateway_instances_received_total", REFUSED) == before + 1

    monkeypatch.setattr(metrics, "_complained", False)
    with caplog.at_level(logging.ERROR, logger="core.metrics"):
        count(INSTANCES_RECEIVED, "one label of two")  # what prometheus-client refuses is swallowed
        count(INSTANCES_RECEIVED, "dimse", "0x0000", amount=-1)  # a counter never goes down
    assert [r.getMessage() for r in caplog.records] == [
        "metrics: a figure could not be recorded (later failures are not logged)"
    ]


def test_a_timed_block_is_observed_when_it_raises() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("test_block_seconds", "a block", ["name"], registry=registry)
    with pytest.raises(KeyError), timed(histogram, "failing"):
        raise KeyError("boom")
    assert registry.get_sample_value("test_block_seconds_count", {"name": "failing"}) == 1
    with timed(histogram, "too", "many"):  # a wrong label set: the block runs and nothing is raised
        pass
