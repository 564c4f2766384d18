"""Worker processes that check and summarize untrusted OVF documents, fed in batches.

Why processes: an OVF_STORE holds thousands of documents and the agent reads
every byte of them - checking each on upload, summarizing each to list a
store. libxml2 is fast, but the Python around it holds the GIL, so threads do
not add up; processes do (listing 10,000 entities takes half the time on two).
They also keep libxml2 - fed bytes that anyone with write access to the
storage domain chose - out of the daemon's address space, under an address
space limit: a parser crash or blow-up costs one batch, not the agent.

The daemon starts the pool once it serves (the ``spawn`` method: a fresh
interpreter that imports only this module, the OVF readers - `safexml`,
`reader`, `model`, `tarstream` - and `storage.streamio` for O_DIRECT reads;
never a copy of the daemon's threads, sockets or locks);
other users start it on first use. Workers leave when the daemon closes the
pool, or by themselves within a second of the daemon's death, so a SIGKILLed
daemon leaves no orphans. A pool whose worker died is replaced on the next call.

Work reaches them two ways: documents in batches (`batches.OvfBatcher`), for
the strict ``?check=xml`` upload; and byte ranges of a committed store volume
(`index`), which each worker reads from the storage itself - so building a
store's index copies no document between processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from vdsmlite.ovf import tarstream
from vdsmlite.ovf.model import OvfError, compact_json
from vdsmlite.ovf.reader import parse
from vdsmlite.ovf.safexml import OvfValidator
from vdsmlite.storage import streamio

log = logging.getLogger("vdsmlite.ovf.workers")

# A summary, or why the document could not be summarized.
Summary = dict[str, Any] | str

# What indexing a byte range of a store yields for each ``.ovf`` member, in archive
# order: (its name without ".ovf", lower case; where its header is; its size; and
# either (the entity's id, its summary as `compact_json` JSON) or why it has none).
# Bytes, not the summary's dicts: they cost less to ship, and the daemon keeps them
# as they come (see `sdm.entityset`).
IndexedMember = tuple[str, int, int, tuple[str, bytes] | str]


# How much lower than the daemon's the parser processes' CPU priority is.
NICENESS = 10


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

    def index(self, path: str, start: int, end: int,
              block_size: int) -> Future[list[IndexedMember]]:
        """The members whose headers lie in ``[start, end)`` of the archive at the
        start of `path` - a committed store, already validated - read by the worker
        itself with O_DIRECT. `start` and `end` are member boundaries
        (`tarstream.ArchiveSummary.splits`)."""
        return self._submit(_index_range, (path, start, end, block_size))

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
                error = OvfError("an OVF parser process died while reading this batch")
            try:
                if error is not None:
                    outer.set_exception(error)
                else:
                    outer.set_result(done.result())
            except InvalidStateError:
                pass  # the caller cancelled it (gave up on the work) meanwhile

        def forward_cancel(mine: Future[Any]) -> None:
            if mine.cancelled():
                inner.cancel()  # not started yet: never started; running: ends unheard

        inner.add_done_callback(relay)
        outer.add_done_callback(forward_cancel)
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


# --- in the worker processes ---------------------------------------------------------


def _init_worker(daemon_pid: int, memory_limit: int) -> None:
    # The daemon handles SIGINT/SIGTERM and closes the pool; a terminal's Ctrl-C
    # must not print a traceback from every worker as well.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Indexing a store is background work of up to two cores for seconds after each
    # upload (11-14 s for 88,000 OVFs): the host's VMs, and the daemon itself, come
    # first when the CPU is short. Idle cores are still used whole.
    os.nice(NICENESS)
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
    return [_summary(data) for data in docs]


def _index_range(task: tuple[str, int, int, int]) -> list[IndexedMember]:
    path, start, end, block_size = task
    try:
        data = streamio.read_range(path, start, end - start, block_size)
    except OSError as e:
        raise OvfError(f"{path}: {e}") from e
    return list(_members_in(data, 0, len(data), start))


def _members_in(buf: bytes, pos: int, end: int,
                offset: int) -> Iterator[IndexedMember]:
    # The framing was checked when the store was committed; headers are parsed again
    # all the same, so a store changed since cannot make this read past the range.
    while pos < end:
        header = tarstream.parse_header(buf[pos:pos + tarstream.BLOCK], offset)
        data_end = pos + tarstream.BLOCK + header.size
        if data_end > end:
            raise OvfError(f"{header.name} runs past the end of its range")
        if header.name.endswith(".ovf"):
            summary = _summary(buf[pos + tarstream.BLOCK:data_end])
            indexed = summary if isinstance(summary, str) else \
                (summary["id"], compact_json(summary))
            yield header.name[:-4].lower(), offset, header.size, indexed
        # info.json and metadata.json: the daemon has them from the archive's scan
        step = tarstream.BLOCK + header.size + (-header.size % tarstream.BLOCK)
        pos += step
        offset += step


def _summary(data: bytes) -> Summary:
    try:
        return parse(data).to_dict()
    except OvfError as e:
        return str(e)
    except MemoryError:
        return "too large to parse within the parser's memory limit"
