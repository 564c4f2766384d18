"""Pauses of Python's cyclic garbage collector: timed, counted, and logged when long.

A collection holds the GIL: while it runs, nothing in the daemon runs - no RPC
answer, no lease check, no upload's receiving thread. A full (generation 2)
collection walks every object the collector tracks, and an index of a large
OVF_STORE kept in memory as dicts was millions of them (now kept as bytes: see
`sdm.entityset`). Measured with this module, before that change: a
daemon taking six 1 GiB uploads of 88,000 entities each (each indexed after its
commit) ran 21 full collections of 0.12-1.17 s, one every 4-8 s while indexes
were built, growing with the indexes kept; benchmark uploads that met one took
1.3 s longer than their commit, with 1.7-2.2 s of CPU where the others used
0.4-0.6 s. So every collection is timed into ``vdsmlite_gc_pause_seconds``, and
one longer than LONG_PAUSE is logged.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger("vdsmlite.gcwatch")

LONG_PAUSE = 0.1  # seconds: a collection this long is worth a line in the log


class GcWatch:
    """Times the collector's runs (one instance installed per daemon)."""

    def __init__(self, pauses: Histogram) -> None:
        self._pauses = pauses
        self._started: float | None = None
        self.long_pauses = 0

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector itself, GIL held: cheap, and never raising.
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        elapsed = time.perf_counter() - self._started
        self._started = None
        generation = int(info.get("generation", -1))
        self._pauses.labels(str(generation)).observe(elapsed)
        if elapsed >= LONG_PAUSE:
            self.long_pauses += 1
            log.warning("garbage collection of generation %d took %.2fs (%d objects "
                        "freed): the whole daemon waited", generation, elapsed,
                        int(info.get("collected", 0)))
