"""Worker processes that check and summarize untrusted OVF documents, fed in batches.

Why processes: an OVF_STORE holds thousands of documents and the agent reads
every byte of them - checking each on upload, summarizing each to list a
store. libxml2 is fast, but the Python around it holds the GIL, so threads do
not add up; processes do (listing 10,000 entities takes half the time on two).
They also keep libxml2 - fed bytes that anyone with write access to the
storage domain chose - out of the daemon's address space, under an address
space limit: a parser crash or blow-up costs one batch, not the agent.

The daemon starts the pool once it serves (the ``spawn`` method: a fresh
interpreter that imports only this module and the OVF readers - `safexml`,
`reader`, `model` - never a copy of the daemon's threads, sockets or locks);
other users start it on first use. Workers leave when the daemon closes the
pool, or by themselves within a second of the daemon's death, so a SIGKILLed
daemon leaves no orphans. A pool whose worker died is replaced on the next call.

`OvfBatcher` is how a stream of documents reaches the workers: in batches,
bounded in bytes, results in order.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

from vdsmlite.ovf.model import OvfError
from vdsmlite.ovf.reader import parse
from vdsmlite.ovf.safexml import OvfValidator

log = logging.getLogger("vdsmlite.ovf.workers")

# A summary, or why the document could not be summarized.
Summary = dict[str, Any] | str

# An OVF document and the name it goes by (its OVF_STORE member name).
NamedDoc = tuple[str, bytes]

BATCH_BYTES = 256 * 1024  # OVF bytes per task for the worker processes
AHEAD_BYTES = 8 * 1024 * 1024  # OVF bytes in their hands at most


class OvfWorkers:
    def __init__(self, processes: int, memory_limit: int) -> None:
        if processes < 1:
            raise ValueError("at least one worker process")
        self.processes = processes
        self.memory_limit = memory_limit
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def check(self, docs: list[tuple[str, bytes]]) -> Future[None]:
        """Check (name, document) pairs as the upload validator does; the future
        fails with OvfError("<name>: <why>") for the first bad one."""
        return self._submit(_check_batch, docs)

    def summarize(self, docs: list[bytes]) -> Future[list[Summary]]:
        """Each document's summary (`Entity.to_dict()`), or the reason it has none."""
        return self._submit(_summarize_batch, docs)

    def start(self) -> None:
        """Start every worker now rather than on first use (blocking; ~0.1 s each).

        The daemon calls this once it serves, so the first listing after start-up -
        typically the engine reading a domain just attached - pays no process start.
        """
        pool = self._get_pool()
        # One task per worker, submitted before any can finish, makes the pool
        # spawn them all (it spawns when no worker is idle).
        for future in [pool.submit(os.getpid) for _ in range(self.processes)]:
            future.result()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes alive now (for tests and diagnostics)."""
        with self._lock:
            pool = self._pool
        if pool is None:
            return []
        processes = getattr(pool, "_processes", None) or {}
        return sorted(pid for pid, proc in processes.items() if proc.is_alive())

    def _submit(self, fn: Any, docs: Any) -> Future[Any]:
        pool = self._get_pool()
        try:
            inner = pool.submit(fn, docs)
        except BrokenProcessPool:
            self._discard(pool)
            pool = self._get_pool()
            inner = pool.submit(fn, docs)
        outer: Future[Any] = Future()

        def relay(done: Future[Any]) -> None:
            if done.cancelled():
                outer.cancel()
                return
            error = done.exception()
            if isinstance(error, BrokenProcessPool):
                self._discard(pool)
                outer.set_exception(OvfError("an OVF parser process died while reading "
                                             "this batch"))
            elif error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result())

        inner.add_done_callback(relay)
        return outer

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker, initargs=(os.getpid(), self.memory_limit))
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
            else:
                return
        log.warning("an OVF parser process died; starting a new pool")
        pool.shutdown(wait=False, cancel_futures=True)


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


# --- in the worker processes ---------------------------------------------------------


def _init_worker(daemon_pid: int, memory_limit: int) -> None:
    # The daemon handles SIGINT/SIGTERM and closes the pool; a terminal's Ctrl-C
    # must not print a traceback from every worker as well.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    threading.Thread(target=_exit_with_daemon, args=(daemon_pid,), daemon=True,
                     name="parent-watch").start()


def _exit_with_daemon(daemon_pid: int) -> None:
    # Workers block reading their task queue, whose write end they hold too, so
    # they would never see the daemon go: watch for being re-parented instead.
    while os.getppid() == daemon_pid:
        time.sleep(1.0)
    os._exit(0)


def _check_batch(docs: list[tuple[str, bytes]]) -> None:
    for name, data in docs:
        validator = OvfValidator()
        try:
            validator.feed(data)
            validator.close()
        except OvfError as e:
            raise OvfError(f"{name}: {e}") from e
        except MemoryError:
            # Not `from e`: at its memory limit, the worker would have to format and
            # ship the MemoryError's traceback too.
            raise OvfError(f"{name}: too large to check within the parser's memory "
                           "limit") from None


def _summarize_batch(docs: list[bytes]) -> list[Summary]:
    out: list[Summary] = []
    for data in docs:
        try:
            out.append(parse(data).to_dict())
        except OvfError as e:
            out.append(str(e))
        except MemoryError:
            out.append("too large to parse within the parser's memory limit")
    return out
