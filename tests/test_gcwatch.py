"""The garbage collector's pauses: timed into the metrics, logged when long."""

from __future__ import annotations

import gc
import logging

import pytest
from prometheus_client import CollectorRegistry, Histogram

from vdsmlite import gcwatch

pytestmark = pytest.mark.unit


def _pauses() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("pauses", "test", ["generation"], registry=registry)


def test_every_collection_is_timed_and_a_long_one_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    registry, pauses = _pauses()
    watch = gcwatch.GcWatch(pauses)
    watch.install()
    try:
        gc.collect(0)
        assert registry.get_sample_value("pauses_count", {"generation": "0"}) >= 1
        assert watch.long_pauses == 0
        # Every real collection counts as long: the log line an operator would see.
        monkeypatch.setattr(gcwatch, "LONG_PAUSE", 0.0)
        with caplog.at_level(logging.WARNING, logger="vdsmlite.gcwatch"):
            gc.collect(2)
        assert watch.long_pauses >= 1
        assert any("garbage collection of generation 2 took" in r.getMessage()
                   for r in caplog.records)
        assert registry.get_sample_value("pauses_count", {"generation": "2"}) >= 1
    finally:
        watch.uninstall()
    assert watch._callback not in gc.callbacks
    before = registry.get_sample_value("pauses_count", {"generation": "2"})
    gc.collect(2)
    assert registry.get_sample_value("pauses_count", {"generation": "2"}) == before
