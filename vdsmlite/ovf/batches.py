"""Documents handed to worker processes in batches, in order, bounded in bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

# An OVF document and the name it goes by (its OVF_STORE member name).
NamedDoc = tuple[str, bytes]

BATCH_BYTES = 256 * 1024  # OVF bytes per task for the worker processes
AHEAD_BYTES = 8 * 1024 * 1024  # OVF bytes in their hands at most


R = TypeVar("R")


class OvfBatcher(Generic[R]):
    """Documents handed to worker processes in batches, in order, bounded in bytes.

    One task per 9 KB document would cost more than the work, so documents go
    in batches of about `batch_bytes`. At most `ahead_bytes` are out at a time:
    memory stays bounded, and a failure surfaces at most that far behind the
    reader feeding `add` - always by `finish`.

    `submit` hands one batch over (e.g. `OvfWorkers.check`); batches are
    collected oldest first, so `on_result` sees them in document order, with the
    names of the batch's documents. A failed batch cancels those still out, and
    its exception is raised from `add` or `finish`.
    """

    def __init__(self, submit: Callable[[list[NamedDoc]], Future[R]],
                 on_result: Callable[[list[str], R], None] | None = None, *,
                 batch_bytes: int = BATCH_BYTES, ahead_bytes: int = AHEAD_BYTES) -> None:
        self._submit = submit
        self._on_result = on_result
        self._batch_bytes_max = batch_bytes
        self._ahead_bytes = ahead_bytes
        self._batch: list[NamedDoc] = []
        self._batch_bytes = 0
        # Batches out: their documents' names, the result to come, their size.
        self._pending: deque[tuple[list[str], Future[R], int]] = deque()
        self._pending_bytes = 0

    def add(self, name: str, data: bytes) -> None:
        self._batch.append((name, data))
        self._batch_bytes += len(data)
        if self._batch_bytes >= self._batch_bytes_max:
            self._send()
        # Collect what is done without waiting, so an error surfaces early...
        while self._pending and self._pending[0][1].done():
            self._collect_oldest()
        # ...and wait only when too much is out.
        while self._pending_bytes > self._ahead_bytes:
            self._collect_oldest()

    def finish(self) -> None:
        """Send what is left and wait for every result."""
        if self._batch:
            self._send()
        while self._pending:
            self._collect_oldest()

    def cancel(self) -> None:
        """Drop everything not yet collected (the reader failed, or a batch did)."""
        for _, future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._pending_bytes = 0
        self._batch = []
        self._batch_bytes = 0

    def _send(self) -> None:
        names = [name for name, _ in self._batch]
        self._pending.append((names, self._submit(self._batch), self._batch_bytes))
        self._pending_bytes += self._batch_bytes
        self._batch = []
        self._batch_bytes = 0

    def _collect_oldest(self) -> None:
        names, future, size = self._pending.popleft()
        self._pending_bytes -= size
        try:
            result = future.result()
        except BaseException:
            self.cancel()
            raise
        if self._on_result is not None:
            self._on_result(names, result)
