"""DirectWriter's lifecycle: NEW -> STREAMING -> FINISHING -> CLOSED, or ABORTING -> CLOSED."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run
from vdsmlite.storage.streamio import ChunkSource, DirectWriter, WriterState

pytestmark = pytest.mark.unit

BUF = 4096


def _source(*chunks: bytes) -> ChunkSource:
    async def gen() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
    return ChunkSource(gen())


async def _blocking(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _volume(tmp_path: Path, size: int = 4 * BUF) -> str:
    path = tmp_path / "vol"
    path.write_bytes(b"\xff" * size)
    return str(path)


def test_write_finish_close(tmp_path: Path) -> None:
    path = _volume(tmp_path)

    async def main() -> None:
        seen: list[bytes] = []
        w = DirectWriter(path, 4 * BUF, 512, _blocking, buffer_size=BUF,
                         inspect=lambda buf, n: seen.append(buf[:n]))
        assert w.state is WriterState.NEW
        with pytest.raises(RuntimeError, match="needs a streaming writer"):
            await w.receive(_source(b"x"))
        await w.open()
        assert w.state is WriterState.STREAMING
        assert await w.receive(_source(b"a" * 100, b"a" * BUF)) == BUF + 100
        assert await w.finish() == BUF + 100
        assert w.state is WriterState.CLOSED
        # Where the time went: every lane ran, so each says how long it took.
        t = w.timings
        assert t.waiting > 0 and t.inspecting > 0 and t.writing > 0 and t.flushing > 0
        assert "checks" in str(t) and "final flush" in str(t)
        assert b"".join(seen) == b"a" * (BUF + 100)
        with pytest.raises(RuntimeError, match="this one is closed"):
            await w.receive(_source(b"x"))

    run(main())
    data = Path(path).read_bytes()
    assert data[:BUF + 100] == b"a" * (BUF + 100)
    assert data[BUF + 100:BUF + 512] == b"\0" * (512 - 100)  # padded to the block
    assert data[BUF + 512:] == b"\xff" * (3 * BUF - 512)


def test_a_refused_buffer_is_never_written_and_abort_closes(tmp_path: Path) -> None:
    path = _volume(tmp_path)

    class Refused(Exception):
        pass

    def inspect(buf: mmap.mmap, length: int) -> None:
        if buf[:1] == b"b":
            raise Refused("no")

    async def main() -> None:
        w = DirectWriter(path, 4 * BUF, 512, _blocking, buffer_size=BUF, inspect=inspect)
        await w.open()
        with pytest.raises(Refused):
            await w.receive(_source(b"a" * BUF, b"b" * BUF, b"c" * BUF, b"d" * BUF))
            await w.finish()
        await w.abort()
        assert w.state is WriterState.CLOSED

    run(main())
    data = Path(path).read_bytes()
    assert data[BUF:] == b"\xff" * (3 * BUF)


def _held(fn: Any, entered: threading.Event, release: threading.Event) -> Any:
    """`fn`, made to wait for `release` once it is called (`entered` says it was)."""
    def call(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return fn(*args)
    return call


async def _cancel_finish_while_blocked_in(path: str, step: str, data: bytes) -> None:
    """Cancel `finish` while the writer's blocking `step` runs in its thread (a lane
    or the executor); `abort` must wait for that thread (never close the descriptor
    under it), then close."""
    entered, release = threading.Event(), threading.Event()

    async def blocking(fn: Any, *args: Any) -> Any:
        if getattr(fn, "__name__", "") == step:
            fn = _held(fn, entered, release)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    w = DirectWriter(path, 4 * BUF, 512, blocking, buffer_size=BUF)
    if step == "_write_sync":  # the write lane's, not run through `blocking`
        w._write_sync = _held(w._write_sync, entered, release)  # type: ignore[method-assign]
    await w.open()
    await w.receive(_source(data))
    finishing = asyncio.ensure_future(w.finish())
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    aborting = asyncio.ensure_future(w.abort())
    await asyncio.sleep(0.05)
    assert not aborting.done()  # still waiting for the blocked thread
    release.set()
    await aborting
    assert w.state is WriterState.CLOSED


def test_cancelled_finish_does_not_close_under_a_running_write(tmp_path: Path) -> None:
    path = _volume(tmp_path)
    run(_cancel_finish_while_blocked_in(path, "_write_sync", b"a" * 100))
    assert Path(path).read_bytes()[:512] == b"a" * 100 + b"\0" * 412


def test_cancelled_fdatasync_is_waited_for_by_abort(tmp_path: Path) -> None:
    # The descriptor is the syncing thread's to close.
    run(_cancel_finish_while_blocked_in(_volume(tmp_path), "_sync_close", b"a" * BUF))


def _watching_fdatasync(entered: threading.Event, release: threading.Event,
                        writes_during: list[int], error: OSError | None = None) -> Any:
    """Makes writers (`make(path)`) whose first background fdatasync waits for
    `release`, counting the writes the write lane makes meanwhile (and fails with
    `error`, when given one).

    Every write after the first waits until that flush has started: the flush is
    handed to the loop and then to a thread, and a fast write lane could otherwise
    write everything before the flush thread runs at all (CI saw it). A flush run
    inline in the write lane would still fail the count: it would hold the lane until
    `release`, after which nothing is flushing."""
    state = {"flushing": False, "first": True, "writes": 0}

    async def blocking(fn: Any, *args: Any) -> Any:
        def call() -> Any:
            if fn is os.fdatasync and state["first"]:
                state["first"] = False
                state["flushing"] = True
                entered.set()
                release.wait(10)
                state["flushing"] = False
                if error is not None:
                    raise error
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    def make(path: str) -> DirectWriter:
        w = DirectWriter(path, 8 * BUF, 512, blocking, buffer_size=BUF, flush_every=BUF)
        write = w._write_sync

        def counted(full: Any) -> None:
            if state["writes"]:
                entered.wait(10)
            state["writes"] += 1
            if state["flushing"]:
                writes_during.append(1)
            write(full)
        w._write_sync = counted  # type: ignore[method-assign]
        return w
    return make


def test_background_flushes_run_beside_the_writes_and_finish_waits_for_them(
        tmp_path: Path) -> None:
    path = _volume(tmp_path, 8 * BUF)
    entered, release = threading.Event(), threading.Event()
    writes_during: list[int] = []

    async def main() -> None:
        w = _watching_fdatasync(entered, release, writes_during)(path)
        await w.open()
        await w.receive(_source(*[bytes([65 + i]) * BUF for i in range(6)]))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        finishing = asyncio.ensure_future(w.finish())
        await asyncio.sleep(0.05)
        assert not finishing.done()  # the first flush still runs: finish waits
        release.set()
        assert await finishing == 6 * BUF
        assert w.flushes == 1  # one at a time: the writes ended before it did

    run(main())
    # The writes went on while the first flush was held.
    assert len(writes_during) >= 1
    data = Path(path).read_bytes()
    assert data[:6 * BUF] == b"".join(bytes([65 + i]) * BUF for i in range(6))


def test_an_injected_background_flush_error_fails_the_stream(tmp_path: Path) -> None:
    path = _volume(tmp_path, 8 * BUF)
    entered, release = threading.Event(), threading.Event()
    release.set()

    async def main() -> None:
        w = _watching_fdatasync(entered, release, [], OSError(5, "EIO"))(path)
        await w.open()
        with pytest.raises(OSError, match="EIO"):
            await w.receive(_source(*[b"a" * BUF for _ in range(6)]))
            await w.finish()
        await w.abort()
        assert w.state is WriterState.CLOSED

    run(main())


def test_abort_waits_for_a_running_background_flush(tmp_path: Path) -> None:
    path = _volume(tmp_path, 8 * BUF)
    entered, release = threading.Event(), threading.Event()

    async def main() -> None:
        w = _watching_fdatasync(entered, release, [])(path)
        await w.open()
        await w.receive(_source(b"a" * BUF, b"b" * BUF))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        aborting = asyncio.ensure_future(w.abort())
        await asyncio.sleep(0.05)
        assert not aborting.done()  # the descriptor is still the flush's
        release.set()
        await aborting
        assert w.state is WriterState.CLOSED

    run(main())


class _ThreadSource:
    """A `BlockingSource` over chunks of bytes; its blocking fill waits while `held`
    is clear (a client that sends nothing yet), until it is told to stop."""

    def __init__(self, *chunks: bytes) -> None:
        self._rest = b"".join(chunks)
        self.held = threading.Event()
        self.held.set()
        self.threads: set[str] = set()

    async def fill(self, view: memoryview) -> int:
        raise AssertionError("a blocking source is read by the thread")

    @contextlib.contextmanager
    def blocking_fills(self) -> Iterator[Callable[[memoryview, threading.Event], int]]:
        yield self._fill

    def _fill(self, view: memoryview, stop: threading.Event) -> int:
        self.threads.add(threading.current_thread().name)
        while not self.held.wait(0.05):
            if stop.is_set():
                raise ConnectionAbortedError("stopped")
        n = min(len(view), len(self._rest))
        view[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


def test_a_blocking_source_is_read_by_a_thread_of_the_writers(tmp_path: Path) -> None:
    path = _volume(tmp_path)
    data = bytes(range(256)) * (3 * BUF // 256) + b"tail"
    source = _ThreadSource(data)
    seen: list[str] = []

    async def main() -> None:
        w = DirectWriter(path, 4 * BUF, 512, _blocking, buffer_size=BUF)
        await w.open()
        assert await w.receive(
            source, before_buffer=lambda: seen.append(threading.current_thread().name),
            progress=lambda done: seen.append(str(done))) == len(data)
        assert await w.finish() == len(data)

    run(main())
    assert source.threads == {"vdsmlite-receive"}
    # before each buffer (and before the fill that finds the end), progress after it
    assert set(seen[::2]) == {"vdsmlite-receive"}
    assert seen[1::2] == [str(n) for n in (BUF, 2 * BUF, 3 * BUF, len(data))]
    assert Path(path).read_bytes()[:len(data)] == data


def test_a_cancelled_receive_stops_its_thread_and_abort_closes(tmp_path: Path) -> None:
    path = _volume(tmp_path)
    source = _ThreadSource(b"a" * BUF, b"b" * 100)
    source.held.clear()  # the client sends nothing

    async def main() -> None:
        w = DirectWriter(path, 4 * BUF, 512, _blocking, buffer_size=BUF)
        await w.open()
        receiving = asyncio.ensure_future(w.receive(source))
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: _wait_for(lambda: source.threads, 10))
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        # The thread's work is over once the cancelled receive returned: all that is
        # left of it is its return (it settles the future as its last act, so under
        # load it may still be listed for a moment).
        receivers = [t for t in threading.enumerate() if t.name == "vdsmlite-receive"]
        for thread in receivers:
            await asyncio.to_thread(thread.join, 10)
            assert not thread.is_alive()
        await w.abort()
        assert w.state is WriterState.CLOSED

    run(main())


def _wait_for(condition: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


def test_waiting_for_a_slow_write_holds_no_thread_of_the_blocking_pool(
        tmp_path: Path) -> None:
    # A write stuck in the storage (a hung NFS server) keeps its lane; `finish`, which
    # waits for the lanes, must not take a thread of the pool other work needs.
    path = _volume(tmp_path)
    entered, release = threading.Event(), threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)

    async def one_thread(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main() -> None:
        w = DirectWriter(path, 4 * BUF, 512, one_thread, buffer_size=BUF)
        w._write_sync = _held(w._write_sync, entered, release)  # type: ignore[method-assign]
        await w.open()
        await w.receive(_source(b"a" * 100))
        finishing = asyncio.ensure_future(w.finish())
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        # (the held write gives up after 10 s: the answer must come well before)
        assert await asyncio.wait_for(one_thread(lambda: "answered"), 5) == "answered"
        assert not finishing.done()
        release.set()
        assert await finishing == 100

    try:
        run(main())
    finally:
        release.set()
        pool.shutdown()

