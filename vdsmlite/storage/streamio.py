"""Streaming bytes into and out of volumes with O_DIRECT, in bounded memory.

`DirectWriter` takes a `Source` - anything that can place the next bytes of a
stream into a buffer it is given - and has it fill page-aligned buffers: a
door that receives straight into them (`http.putserver`) costs no copy, an
async iterator of chunks (`ChunkSource`) one. Each full buffer goes
through two lanes, each a thread of the writer's own: the *inspect* lane
shows it to an optional callback (the OVF_STORE validator, which sees every
byte in order, in the buffer itself) and the *write* lane writes it with
O_DIRECT. While buffer N is written, N+1 is inspected and N+2 is filled from
the network, so receiving, validating and writing overlap and the slowest of
the three sets the pace; memory stays at three buffers whatever the stream's
size. The lanes hand buffers on through thread queues and wake the event loop
only when the receiver waits for a free buffer: with a lane task per buffer
on the loop instead, each buffer cost three executor round trips, ~0.1 s of
the loop's CPU per GiB (a sixth of an upload's). A source a thread can read
(a `BlockingSource`: the upload door's socket) is received by a third thread
of the writer's, so a buffer goes from the network to the storage with no
event loop turn at all. `finish` pads the last block
with zeros, writes it, and fdatasyncs: when it returns, the data is on the
storage.

O_DIRECT bypasses our page cache, not every cache below it: a volume on a
loop-mapped LV (or a file on NFS, or a SAN with a write cache) may hold what
was written until it is flushed. So every `FLUSH_EVERY` bytes the write lane
starts an fdatasync in the background (one at a time, never waited for by the
writes): the storage flushes while the stream goes on, and the final
fdatasync only has the tail left. Measured on a block domain over a loop LUN,
1 GiB: the final flush took 0.31 s, a quarter of the upload; with background
flushes 0.02-0.06 s. A flush holds the writes queued behind it (the loop device
serializes them), so small ones every 32 MiB, which the spare buffers absorb,
beat large ones: median upload 700-730 MiB/s flushing every 128 MiB, 800-850
every 32 MiB, about 620 never (three runs per figure, twice or more each).

A writer's life is one `WriterState`: NEW -> STREAMING (`open`) -> FINISHING
(`finish`) -> CLOSED, or -> ABORTING (`abort`, from any state) -> CLOSED.

`read_chunks` reads a byte range back with O_DIRECT (other hosts may have
written it; the page cache must not answer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import enum
import functools
import mmap
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import NamedTuple, Protocol, TypeVar

from vdsmlite import cancel, failpoints
from vdsmlite.blocking import RunBlocking, until_done

T = TypeVar("T")

DEFAULT_BUFFER = 8 << 20  # ovirt-imageio's measured sweet spot for storage writes
BUFFERS = 3  # one filling, one being inspected, one being written
FLUSH_EVERY = 32 << 20  # bytes written between background flushes (see above)

# Shown each buffer in turn: the buffer itself (searchable in place, never copied)
# and how many of its first bytes are stream data.
Inspect = Callable[[mmap.mmap, int], None]


class CapacityExceeded(Exception):
    pass


class Source(Protocol):
    """A stream of bytes that fills the buffers it is given."""

    async def fill(self, view: memoryview) -> int:
        """Place the stream's next bytes at ``view[:n]``: as many as fit, fewer only
        where the stream ends; 0 once it has ended. The view is not kept after."""
        ...


# `fill` to call from a thread, blocking; once the event is set it returns or
# raises within about a second (the reader was asked to stop).
BlockingFill = Callable[[memoryview, threading.Event], int]


class BlockingSource(Source, Protocol):
    """A source that can also be read by a thread, without the event loop (a
    socket): `blocking_fills()` gives the `BlockingFill` for the rest of the
    stream while its context lasts, or None when it cannot now (say, bytes it
    holds must go first through `fill`)."""

    def blocking_fills(self) -> contextlib.AbstractContextManager[BlockingFill | None]:
        ...


class _Stopped(Exception):
    """The receiving thread was asked to stop (its caller was cancelled)."""


class ChunkSource:
    """An async iterator of chunks as a `Source` (each byte copied once)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = memoryview(b"")

    async def fill(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            if not self._rest:
                chunk = await anext(self._chunks, None)
                if chunk is None:
                    break
                self._rest = memoryview(chunk)
            take = min(len(self._rest), len(view) - done)
            view[done:done + take] = self._rest[:take]
            self._rest = self._rest[take:]
            done += take
        return done


@dataclasses.dataclass
class Timings:
    """Where a stream's time went, in seconds (the lanes overlap: they do not add up
    to the whole). What an operator reads to tell a slow client from slow storage."""

    waiting: float = 0.0     # for the source to fill buffers (the network, the client)
    held_up: float = 0.0     # for a free buffer: the checks or the writes were behind
    inspecting: float = 0.0  # the inspect callback (e.g. the archive checks)
    writing: float = 0.0     # O_DIRECT writes
    flushing: float = 0.0    # the final fdatasync (and the background flush it waited for)

    def __str__(self) -> str:
        return (f"waiting for data {self.waiting:.2f}s, for buffers {self.held_up:.2f}s, "
                f"checks {self.inspecting:.2f}s, writes {self.writing:.2f}s, "
                f"final flush {self.flushing:.2f}s")


class WriterState(enum.Enum):
    NEW = "new"              # buffers mapped; `open` not called yet
    STREAMING = "streaming"  # lanes running; `receive` takes data
    FINISHING = "finishing"  # `finish`: the last buffer is in the lanes, then fdatasync
    ABORTING = "aborting"    # `abort`: the lanes stop; nothing more is written
    CLOSED = "closed"        # descriptor closed, buffers released


class _Full(NamedTuple):
    """A buffer on its way through the lanes."""

    buf: int           # which of the writer's buffers
    length: int        # bytes to write (the last one is padded to a block)
    offset: int        # where on the volume
    inspect_len: int   # bytes of stream data in it (without the padding)


class DirectWriter:
    def __init__(self, path: str, capacity: int, block_size: int, run_blocking: RunBlocking,
                 *, inspect: Inspect | None = None, buffer_size: int = DEFAULT_BUFFER,
                 flush_every: int = FLUSH_EVERY) -> None:
        if buffer_size % 4096:
            raise ValueError("buffer size must be a multiple of 4096")
        self._flush_every = flush_every
        self._unflushed = 0  # bytes written since the last background flush began
        self._flushing: concurrent.futures.Future[None] | None = None
        self.flushes = 0  # background flushes started (what the tests look at)
        self.timings = Timings()
        self.path = path
        self.capacity = capacity
        self.block_size = block_size
        self._run = run_blocking
        self._inspect = inspect
        self._buffers = [mmap.mmap(-1, buffer_size) for _ in range(BUFFERS)]
        # Free buffers go back to the receiver through `_free`, or straight to its
        # `_waiter` when it waits for one (the only time a lane wakes the loop).
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(1, BUFFERS):
            self._free.put(index)
        self._waiter: asyncio.Future[int] | None = None
        self._handoff = threading.Lock()  # between `_free` and `_waiter`
        self._to_inspect: queue.SimpleQueue[_Full | None] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[_Full | None] = queue.SimpleQueue()
        self._lanes_ended: asyncio.Future[tuple[None, None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._syncing: asyncio.Future[None] | None = None  # finish's fdatasync + close
        self._error: BaseException | None = None
        self._state = WriterState.NEW
        self._current = 0
        self._fill = 0
        self._offset = 0  # where the current buffer goes on the volume
        self._fd: int | None = None
        self.written = 0  # bytes accepted so far (before padding)

    @property
    def state(self) -> WriterState:
        return self._state

    def _require(self, state: WriterState, what: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"DirectWriter.{what} needs a {state.value} writer, "
                               f"this one is {self._state.value}")

    async def open(self) -> None:
        self._require(WriterState.NEW, "open")
        self._loop = asyncio.get_running_loop()
        self._fd = await self._run(os.open, self.path,
                                   os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        # Gathered now: finish and abort both wait for the same two threads.
        self._lanes_ended = asyncio.gather(self._thread("inspect", self._inspect_lane),
                                           self._thread("write", self._write_lane))
        self._state = WriterState.STREAMING

    def _thread(self, name: str, work: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run `work` in a thread of the writer's own, in the caller's context (its
        request id in log lines, its job's cancel token); the future settles when
        the thread ends, with no pool thread held to wait for it."""
        assert self._loop is not None
        loop = self._loop
        done: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()

        def run() -> None:
            try:
                result = context.run(work, *args)
            except BaseException as e:
                settle: Callable[[], None] = functools.partial(_settle_error, done, e)
            else:
                settle = functools.partial(_settle, done, result)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle)

        threading.Thread(target=run, name=f"vdsmlite-{name}", daemon=True).start()
        return done

    # --- the lanes (threads) ------------------------------------------------------------

    def _inspect_lane(self) -> None:
        try:
            while ((full := self._to_inspect.get()) is not None
                   and self._state is not WriterState.ABORTING):
                if self._inspect is not None and full.inspect_len:
                    started = time.monotonic()
                    self._inspect_sync(full)
                    self.timings.inspecting += time.monotonic() - started
                self._to_write.put(full)
        except BaseException as e:
            self._fail(e)
        finally:
            self._to_write.put(None)

    def _write_lane(self) -> None:
        try:
            while (full := self._to_write.get()) is not None:
                if self._error is not None or self._state is WriterState.ABORTING:
                    return  # the inspect lane refused something: write nothing after it
                started = time.monotonic()
                self._write_sync(full)
                self.timings.writing += time.monotonic() - started
                self._give_back(full.buf)
                self._unflushed += full.length
                if self._unflushed >= self._flush_every and \
                        (self._flushing is None or self._flushing.done()):
                    self._flush_in_background()
        except BaseException as e:
            self._fail(e)

    def _give_back(self, index: int) -> None:
        """A free buffer (or -1: the lanes failed) for the receiver."""
        with self._handoff:
            waiter, self._waiter = self._waiter, None
            if waiter is None:
                self._free.put(index)
                return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, waiter, index)

    def _flush_in_background(self) -> None:
        """From the write lane: an fdatasync through `run_blocking`, not waited for."""
        if self._flushing is not None:
            self._flushing.result()  # done: a failed flush fails the stream here
        self._unflushed = 0
        self.flushes += 1
        assert self._loop is not None
        self._flushing = asyncio.run_coroutine_threadsafe(self._flush(), self._loop)

    async def _flush(self) -> None:
        assert self._fd is not None
        await self._run(os.fdatasync, self._fd)

    async def _flushed(self) -> None:
        """Wait for the background flush, if one runs (its thread uses the descriptor)."""
        if self._flushing is not None:
            await asyncio.shield(asyncio.wrap_future(self._flushing))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        # Wake a receiver waiting for a free buffer; it will see the error.
        self._give_back(-1)

    async def _lanes_done(self) -> None:
        """Until both lane threads have ended (shielded: a cancelled caller leaves
        them to end, and abort waits for them again)."""
        assert self._lanes_ended is not None
        await asyncio.shield(self._lanes_ended)

    def _inspect_sync(self, full: _Full) -> None:
        assert self._inspect is not None
        self._inspect(self._buffers[full.buf], full.inspect_len)

    def _write_sync(self, full: _Full) -> None:
        assert self._fd is not None
        with memoryview(self._buffers[full.buf]) as whole:
            done = 0
            while done < full.length:
                with whole[done:full.length] as rest:
                    done += os.pwritev(self._fd, [rest], full.offset + done)

    # --- the caller's side --------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def receive(self, source: Source, *, before_buffer: Callable[[], None] | None = None,
                      progress: Callable[[int], None] | None = None) -> int:
        """Have `source` fill the buffers until it ends; returns the bytes taken.
        `before_buffer` runs before each buffer is asked for (it may raise to stop),
        `progress` after each fill with the bytes taken so far (both from a thread
        of the writer's, if the source is a `BlockingSource`)."""
        blocking_fills = getattr(source, "blocking_fills", None)
        while True:
            self._raise_if_failed()
            self._require(WriterState.STREAMING, "receive")
            if blocking_fills is not None:
                with blocking_fills() as fill:
                    if fill is not None:
                        return await self._receive_in_thread(fill, before_buffer, progress)
            if before_buffer is not None:
                before_buffer()
            with self._room() as view:
                n = await source.fill(view)
            if n == 0:
                return self.written
            await self._taken(n)
            if progress is not None:
                progress(self.written)

    @contextlib.contextmanager
    def _room(self) -> Iterator[memoryview]:
        """The current buffer's free part, for the source to fill; the time it takes
        counts as waiting for data."""
        buf = self._buffers[self._current]
        # One byte more than the volume holds: a stream that fills it tells a body
        # too large before anything past the volume's end is written.
        room = min(len(buf) - self._fill, self.capacity - self.written + 1)
        started = time.monotonic()
        with memoryview(buf) as whole, whole[self._fill:self._fill + room] as view:
            yield view
        self.timings.waiting += time.monotonic() - started

    async def _taken(self, n: int) -> None:
        """`n` more bytes are in the current buffer; a full one goes to the lanes."""
        if self._add(n):
            self._current = await self._free_buffer()
            self._raise_if_failed()

    def _add(self, n: int) -> bool:
        """Count `n` more bytes in the current buffer; if that filled it, hand it to
        the lanes and say so (the caller then waits for a free one)."""
        if self.written + n > self.capacity:
            raise CapacityExceeded(f"stream is larger than the volume ({self.capacity} bytes)")
        self.written += n
        self._fill += n
        buf = self._buffers[self._current]
        if self._fill < len(buf):
            return False
        self._to_inspect.put(_Full(self._current, len(buf), self._offset, len(buf)))
        self._offset += len(buf)
        self._fill = 0
        return True

    async def _receive_in_thread(self, fill: BlockingFill,
                                 before_buffer: Callable[[], None] | None,
                                 progress: Callable[[int], None] | None) -> int:
        """`receive` by a thread of the writer's own for the rest of the stream: the
        buffers go from the source to the lanes with no event loop turn between.
        (An executor round trip per buffer cost the loop ~0.04 s of CPU per GiB.) If
        the caller is cancelled, the thread is told to stop and waited for: it
        returns at its next buffer or read, within about a second."""
        stop = threading.Event()

        def stopping() -> None:
            stop.set()
            self._free.put(-1)  # wakes it if it waits for a free buffer

        done = self._thread("receive", self._receive_blocking, fill, stop, before_buffer,
                            progress)
        return await until_done(done, on_cancel=stopping)

    def _receive_blocking(self, fill: BlockingFill, stop: threading.Event,
                          before_buffer: Callable[[], None] | None,
                          progress: Callable[[int], None] | None) -> int:
        while True:
            if stop.is_set():
                raise _Stopped()
            self._raise_if_failed()
            cancel.check()  # the job was stopped
            if before_buffer is not None:
                before_buffer()
            with self._room() as view:
                n = fill(view, stop)
            if n == 0:
                return self.written
            if self._add(n):
                started = time.monotonic()
                self._current = self._free.get()
                self.timings.held_up += time.monotonic() - started
                if stop.is_set():
                    raise _Stopped()
                self._raise_if_failed()
            if progress is not None:
                progress(self.written)

    async def _free_buffer(self) -> int:
        """The next free buffer; with every buffer in the lanes, wait for one
        (back-pressure)."""
        with self._handoff:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                assert self._loop is not None
                waiter = self._waiter = self._loop.create_future()
        started = time.monotonic()
        try:
            return await waiter
        finally:
            self.timings.held_up += time.monotonic() - started

    async def finish(self) -> int:
        """Write what is buffered (zero-padded to a block), fdatasync, close."""
        self._raise_if_failed()
        self._require(WriterState.STREAMING, "finish")
        self._state = WriterState.FINISHING
        if self._fill:
            buf = self._buffers[self._current]
            padded = -(-self._fill // self.block_size) * self.block_size
            buf[self._fill:padded] = b"\0" * (padded - self._fill)
            self._to_inspect.put(_Full(self._current, padded, self._offset, self._fill))
        self._to_inspect.put(None)
        # Shielded: if our caller is cancelled here, the lanes go on (a write may be
        # in a thread); it aborts, and abort waits for them before closing the descriptor.
        await self._lanes_done()
        self._raise_if_failed()
        started = time.monotonic()
        await self._flushed()
        self._syncing = asyncio.ensure_future(self._run(self._sync_close))
        await asyncio.shield(self._syncing)
        self.timings.flushing = time.monotonic() - started
        self._state = WriterState.CLOSED
        return self.written

    def _sync_close(self) -> None:
        if self._fd is not None:
            try:
                # Every byte is written (O_DIRECT), none is known durable yet.
                failpoints.hit("streamio.finish.before_fdatasync")
                os.fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
        self._release()

    async def abort(self) -> None:
        """Stop without syncing; what was written stays (the caller marks it invalid).

        The lanes are told to stop and waited for: a lane may be writing into the
        descriptor we are about to close. Shielded, so a second cancellation of the
        caller cannot skip the cleanup either.
        """
        self._state = WriterState.ABORTING
        self._to_inspect.put(None)
        await asyncio.shield(asyncio.ensure_future(self._drain_and_close()))

    async def _drain_and_close(self) -> None:
        if self._lanes_ended is not None:
            await self._lanes_done()
        if self._flushing is not None:
            await asyncio.gather(asyncio.wrap_future(self._flushing), return_exceptions=True)
        if self._syncing is not None:
            # A cancelled finish: its thread closes the descriptor; never close it twice.
            await asyncio.gather(self._syncing, return_exceptions=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._release()
        self._state = WriterState.CLOSED

    def _release(self) -> None:
        for buf in self._buffers:
            if not buf.closed:
                try:
                    buf.close()
                except BufferError:
                    # A traceback (a refused upload) still holds a view of it; the
                    # mapping is freed with the last view.
                    pass


def _settle(waiter: asyncio.Future[T], result: T) -> None:
    if not waiter.done():
        waiter.set_result(result)


def _settle_error(waiter: asyncio.Future[T], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)


def read_chunks(path: str, size: int, block_size: int,
                chunk: int = DEFAULT_BUFFER) -> Generator[bytes, None, None]:
    """Yield the first `size` bytes of `path`, read with O_DIRECT (blocking generator)."""
    buf = mmap.mmap(-1, chunk)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < size:
            want = min(chunk, -(-(size - offset) // block_size) * block_size)
            n = _read_into(fd, buf, want, offset)
            if n <= 0:
                raise OSError(f"{path}: unexpected end after {offset} of {size} bytes")
            keep = min(n, size - offset)
            yield buf[:keep]
            offset += keep
    finally:
        os.close(fd)
        buf.close()


def read_range(path: str, offset: int, length: int, block_size: int) -> bytes:
    """`length` bytes of `path` from `offset`, read with O_DIRECT (blocking): the
    whole blocks around them are read, the bytes asked for returned."""
    first = offset - offset % block_size
    span = -(-(offset + length) // block_size) * block_size - first
    buf = mmap.mmap(-1, span)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        if _read_into(fd, buf, span, first) < offset - first + length:
            raise OSError(f"{path}: ends before byte {offset + length}")
        return buf[offset - first:offset - first + length]
    finally:
        os.close(fd)
        buf.close()


def _read_into(fd: int, buf: mmap.mmap, want: int, offset: int) -> int:
    """Fill `buf[:want]` from `offset`; how many bytes came (fewer at the end of file)."""
    done = 0
    with memoryview(buf) as whole:
        while done < want:
            with whole[done:want] as rest:
                n = os.preadv(fd, [rest], offset + done)
            if n <= 0:
                break
            done += n
    return done
