"""Pauses of Python's cyclic garbage collector: timed, counted, and logged when long.

A collection holds the GIL: while it runs, nothing in the daemon runs - no RPC
answer, no lease check, no upload's receiving thread. A full (generation 2)
collection walks every object the collector tracks, and an index of a large
OVF_STORE kept in memory is millions of them. Measured with this module: a
daemon taking six 1 GiB uploads of 88,000 entities each (each indexed after its
commit) ran 21 full collections of 0.12-1.17 s, one every 4-8 s while indexes
were built, growing with the indexes kept; benchmark uploads that met one took
1.3 s longer than their commit, with 1.7-2.2 s of CPU where the others used
0.4-0.6 s. So every collection is timed into ``vdsmlite_gc_pause_seconds``, and
one longer than LONG_PAUSE is logged.

`settle` is the remedy for data the daemon keeps for long (an index, as it is
built and once built):
what exists then is moved out of the collector's walks (``gc.freeze``), so a full
collection walks only what came after. Frozen objects are still freed when their
last reference goes (an index dropped from memory is); what the collector would
miss is garbage in reference cycles among them. So the young generations, where
such garbage mostly lives, are collected before each freeze, and at most once every
RESET_INTERVAL a settle thaws everything and runs one full collection first: a
cycle frozen by mistake lives an hour at most, for one long pause an hour.
Measured, the same six uploads as above: full collections of 0.1 s or more went
from 21 (0.12-1.17 s, growing with the indexes kept) to 42 of 0.11-0.63 s with
indexes settled once built (each build's own objects still walked as it grew) to
none with indexes settled as they are built.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger("vdsmlite.gcwatch")

LONG_PAUSE = 0.1  # seconds: a collection this long is worth a line in the log
RESET_INTERVAL = 3600.0  # seconds between full collections of the frozen objects
_last_reset = time.monotonic()


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


def settle() -> None:
    """Take every object alive now out of the collector's future walks (see the
    module doc): for after the daemon has built something large it keeps."""
    global _last_reset
    now = time.monotonic()
    if now - _last_reset >= RESET_INTERVAL:
        _last_reset = now
        gc.unfreeze()
        gc.collect()
    else:
        gc.collect(1)  # the young garbage first: cycles frozen are not freed
    gc.freeze()


def frozen() -> int:
    """How many objects the collector no longer walks."""
    return gc.get_freeze_count()
