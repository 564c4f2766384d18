"""The upload doors' own HTTP server: a PUT's body received straight into the
buffers that are written to the volume.

Through aiohttp a body arrives as chunks it has copied, one event-loop round
per chunk: for a 1 GiB OVF_STORE that was most of the agent's CPU, as much as
ovirt-imageio spends on the whole upload. Here the connection's transport
reads into the O_DIRECT buffer itself (`asyncio.BufferedProtocol`): the kernel
copies each byte once, from the socket into the buffer that goes to the disk;
a chunked body is decoded in place (`wire.ChunkedDecoder`); the consumer is
woken once per buffer (8 MiB), not once per network read. TLS transports work
the same way (asyncio's SSL layer hands decrypted bytes to `get_buffer`). On a
plain connection, given a `run_blocking`, an executor thread reads the body
with blocking ``recv_into`` calls on its own descriptor of the socket (the
transport paused meanwhile), as ovirt-imageio does: no event-loop round per
read, a quarter less CPU.

`rpc.detect` hands this protocol every connection that begins with ``PUT ``.
It reads the request head, hands a `PutRequest` to the door for its path
(`Handler`), writes the door's `Reply` and closes the connection. The body is
read only as the door asks for it (``Expect: 100-continue`` is answered then),
and a body the door refused is drained for a while before the close, so a
client still sending sees the answer rather than a reset.

A connection's life: HEAD (reading the request head) -> BODY (the door runs,
the body is read as it asks) -> DRAIN (the answer is out; what the client still
sends is read and dropped, for `LINGER` seconds at most) -> CLOSED.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

from vdsmlite import cancel, errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.http import wire

log = logging.getLogger("vdsmlite.http.putserver")

HEAD_TIMEOUT = 60.0  # for the whole request head
# A fill returns what came within this many seconds, even if it is not full: the
# job's bytes done and the lease check between buffers go on with a slow client.
PARTIAL_AFTER = 1.0
LINGER = 10.0  # reading what a refused client still sends, so it sees the answer
# The body's reads ask the kernel to wake us only once this many bytes have come
# (SO_RCVLOWAT), or LOWAT_WAIT has passed: then the read takes what is there. A
# client streaming at 50 MB/s or more never meets the wait; one that pauses (or
# a body's last bytes: the kernel was seen to miss the wakeup for them) costs it
# once. The mark is never more than a quarter of the socket's receive buffer: the
# kernel grows a buffer too small for a mark and clamps the receive window to the
# mark itself, and then the sender stops each time the mark is reached until the
# read is done, instead of sending on meanwhile. So the body's socket first gets
# a receive buffer of RECEIVE_BUFFER (the kernel doubles it), where
# net.core.rmem_max allows it; elsewhere the kernel's autotuning stays on and the
# mark follows the buffer as it grows.
#
# Measured, 1 GiB chunked block-domain uploads from curl over loopback, two ways
# alternated in one daemon, 5 uploads each way: 256 KiB marks, autotuned buffer:
# 773-1207 MiB/s, 0.51-0.62 s of CPU a GiB; 1 MiB marks, autotuned: the receiving
# lane slower (waiting for data 0.93-1.08 s of ~1 s uploads, against 0.66-0.84);
# a quarter of the autotuned buffer, at most 1 MiB: 0.50-0.53 s of CPU a GiB;
# that and an 8 MiB buffer: median 1172 MiB/s against 904 for the autotuned
# buffer (781-1423; the receiving no longer the slower lane), CPU 0.47-0.63.
RECEIVE_LOWAT = 1 << 20
RECEIVE_BUFFER = 4 << 20
LOWAT_WAIT = 0.005
_SCRATCH = 64 << 10



def receive_mark(sock: socket.socket, *, rmem_max: int | None) -> int:
    """Ready a connected TCP socket for a body's bulk reads (its receive buffer
    raised to RECEIVE_BUFFER if `rmem_max`, the host's net.core.rmem_max, allows
    it); the low-water mark to read it with: a quarter of its buffer, at most
    RECEIVE_LOWAT."""
    have = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if rmem_max is not None and rmem_max >= RECEIVE_BUFFER and have < 2 * RECEIVE_BUFFER:
        # Setting it turns the kernel's autotuning off for this socket: only where
        # the buffer it gets is as large as autotuning would make it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        have = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return max(1, min(RECEIVE_LOWAT, have // 4))


@functools.cache
def _rmem_max() -> int | None:
    """net.core.rmem_max: the largest receive buffer a process may set (None if
    it cannot be read: the buffer is then left to the kernel)."""
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None

# A body's fill for one thread (`streamio.BlockingFill`).
BlockingFill = Callable[[memoryview, threading.Event], int]


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class PutRequest:
    """A request whose head is read; its body is read with `fill` (a `streamio.Source`)."""

    def __init__(self, head: wire.RequestHead, connection: PutProtocol) -> None:
        self.head = head
        self.path = head.path
        self.query = head.query
        self.headers = head.headers
        self.content_length = head.content_length
        self._connection = connection

    @property
    def has_body_framing(self) -> bool:
        """Content-Length or chunked: how HTTP/1.1 says where a body ends."""
        return self.content_length is not None or self.head.chunked

    async def fill(self, view: memoryview) -> int:
        """`streamio.Source`: the body's next bytes into `view`, as many as fit.

        Raises TransferStalled when the client sends nothing for the stall timeout,
        TransferInterrupted when it goes away or breaks the framing mid-body."""
        return await self._connection.fill(view)

    def blocking_fills(self) -> contextlib.AbstractContextManager[BlockingFill | None]:
        """`streamio.BlockingSource`: `fill` for a thread, the rest of the body."""
        return self._connection.blocking_fills()


Handler = Callable[[PutRequest], Awaitable[Reply]]


class _Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    DRAIN = "drain"
    CLOSED = "closed"


class PutProtocol(asyncio.BufferedProtocol):
    def __init__(self, handler: Handler, *, stall_timeout: float,
                 run_blocking: RunBlocking | None = None) -> None:
        self._handler = handler
        self._stall_timeout = stall_timeout
        # Given, bodies on plain (not TLS) connections are read by executor threads.
        self._run_blocking = run_blocking
        self._sock: socket.socket | None = None
        self._receiving = False  # a thread reads from _sock
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._phase = _Phase.HEAD
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._head = bytearray()
        # the whole head within HEAD_TIMEOUT, then the drain within LINGER
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        # the body
        self._decoder: wire.ChunkedDecoder | None = None
        self._left: int | None = None  # Content-Length bytes still to come
        self._body_done = False
        self._early = b""  # body bytes read with the head, not yet given out
        self._continue_due = False
        self._error: BaseException | None = None  # the body cannot go on
        # a fill in progress
        self._view: memoryview | None = None
        self._got = 0
        self._filled: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._deadline = self._loop.call_later(HEAD_TIMEOUT, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        """What `rpc.detect` read before handing the connection over."""
        self._take_head(memoryview(data))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._phase is _Phase.BODY and self._view is not None:
            room = len(self._view) - self._got
            if self._left is not None:
                room = min(room, self._left)
            return self._view[self._got:self._got + room]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._phase is _Phase.HEAD:
            self._take_head(self._scratch[:nbytes])
        elif self._phase is _Phase.BODY:
            if self._view is None:  # never asked for; kept for the next fill
                self._early += bytes(self._scratch[:nbytes])
                self._pause()
                return
            self._last_data = self._loop.time()
            try:
                self._got += self._body_bytes(self._view, self._got, self._got + nbytes)
            except wire.HttpError as e:
                self._fail_body(errors.TransferInterrupted(f"bad chunked body: {e.message}"))
                return
            if self._got == len(self._view) or self._body_done:
                self._fill_done()
        # DRAIN: dropped

    def eof_received(self) -> bool | None:
        if self._phase is _Phase.BODY and not self._body_done:
            self._fail_body(errors.TransferInterrupted("the client closed the connection "
                                                       "before the end of the body"))
        if self._phase in (_Phase.HEAD, _Phase.DRAIN):
            self._close()  # nothing asked (or the answer is out): nothing to answer
            return None
        return True  # half-closed: the answer can still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _Phase.CLOSED
        self._cancel_timers()
        if not self._receiving:  # else its thread closes it when it returns
            self._close_sock()
        if not self._body_done:
            self._fail_body(errors.TransferInterrupted(
                f"connection lost: {exc}" if exc else "connection lost"))
        self._transport = None

    # --- the head ----------------------------------------------------------------------

    def _take_head(self, data: memoryview) -> None:
        if self._phase is not _Phase.HEAD:
            return
        self._head += data
        end = wire.head_end(self._head)
        if end < 0:
            if len(self._head) > wire.MAX_HEAD:
                self._refuse(wire.HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                            "request head too large"))
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._pause()
        try:
            head = wire.parse_head(bytes(self._head[:end]))
        except wire.HttpError as e:
            self._refuse(e)
            return
        self._early = bytes(self._head[end:])
        self._head.clear()
        self._phase = _Phase.BODY
        if head.chunked:
            self._decoder = wire.ChunkedDecoder()
        else:
            self._left = head.content_length or 0
            self._body_done = not self._left
        self._continue_due = head.expects_continue
        self._task = asyncio.ensure_future(self._serve(PutRequest(head, self)))

    def _head_too_slow(self) -> None:
        self._deadline = None
        log.info("closing upload connection: no whole request head within %.0fs",
                 HEAD_TIMEOUT)
        self._close()

    def _refuse(self, e: wire.HttpError) -> None:
        log.info("refusing upload request: %s", e.message)
        body = errors_json(errors.InvalidParameterException.code, e.message)
        self._answer(Reply(e.status, {"Content-Type": "application/json"}, body))

    # --- the body ----------------------------------------------------------------------

    def _body_bytes(self, buf: memoryview, start: int, end: int) -> int:
        """Raw bytes at buf[start:end] -> body bytes at buf[start:start+n]."""
        if self._decoder is not None:
            n = self._decoder.decode(buf, start, end)
            self._body_done = self._decoder.done
            return n
        assert self._left is not None
        n = min(end - start, self._left)
        self._left -= n
        self._body_done = not self._left
        return n

    async def fill(self, view: memoryview) -> int:
        if self._error is not None:
            raise self._error
        if self._phase is not _Phase.BODY or not len(view):
            return 0
        if self._continue_due:
            self._continue_due = False
            if self._transport is not None:
                self._transport.write(wire.CONTINUE)
        got = 0
        while self._early and got < len(view) and not self._body_done:
            take = min(len(self._early), len(view) - got)
            view[got:got + take] = self._early[:take]
            self._early = self._early[take:]
            got += self._body_bytes(view, got, got + take)
        if got == len(view) or self._body_done:
            return got
        sock = self._plain_socket()
        if sock is not None:
            assert self._run_blocking is not None
            self._receiving = True
            try:
                n: int = await self._run_blocking(self._receive_into, sock, view, got)
            except (errors.TransferInterrupted, errors.TransferStalled) as e:
                self._fail_body(e)
                raise
            finally:
                self._receiving = False
                if self._phase is _Phase.CLOSED:
                    self._close_sock()
            return n
        self._view, self._got = view, got
        self._filled = self._loop.create_future()
        self._last_data = self._loop.time()
        self._stall_timer = self._loop.call_later(self._tick_period(), self._tick)
        self._resume()
        try:
            await self._filled
            return self._got
        finally:
            self._view = None
            self._filled = None
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            self._pause()

    # --- the body, by a blocking thread ---------------------------------------------------

    @contextlib.contextmanager
    def blocking_fills(self) -> Iterator[BlockingFill | None]:
        """A fill for one thread to call, blocking, for the rest of the body; None
        while bytes read with the head or a 100-continue must go first (`fill`),
        under TLS, or without a `run_blocking` (reading on the event loop is what
        was asked then). The socket stays open for it until the context ends."""
        if self._error is not None or self._phase is not _Phase.BODY or self._early or \
                self._continue_due or self._body_done:
            yield None
            return
        sock = self._plain_socket()
        if sock is None:
            yield None
            return
        self._receiving = True
        try:
            yield functools.partial(self._fill_in_thread, sock)
        finally:
            self._receiving = False
            if self._phase is _Phase.CLOSED:
                self._close_sock()

    def _fill_in_thread(self, sock: socket.socket, view: memoryview,
                        stop: threading.Event) -> int:
        if self._error is not None:
            raise self._error
        if self._phase is not _Phase.BODY or self._body_done or not len(view):
            return 0
        try:
            return self._receive_into(sock, view, 0, stop)
        except (errors.TransferInterrupted, errors.TransferStalled) as e:
            self._fail_body(e)  # no future is waiting in this mode: attributes only
            raise

    def _plain_socket(self) -> socket.socket | None:
        """The connection's socket, when bodies can be read from it directly: given a
        `run_blocking` and not under TLS (whose bytes only the transport decrypts)."""
        if self._sock is not None:
            return self._sock
        transport = self._transport
        if self._run_blocking is None or transport is None or \
                transport.get_extra_info("sslcontext") is not None:
            return None
        raw = transport.get_extra_info("socket")
        if raw is None:
            return None
        # A descriptor of our own on the same socket (the transport's stays paused
        # while the body is read), waiting at most PARTIAL_AFTER per read.
        self._sock = socket.socket(fileno=os.dup(raw.fileno()))
        self._sock.settimeout(PARTIAL_AFTER)
        return self._sock

    def _receive_into(self, sock: socket.socket, view: memoryview, got: int,
                      stop: threading.Event | None = None) -> int:
        """`fill` in an executor thread (blocking): recv_into the buffer until it is
        full, the body ends or PARTIAL_AFTER has passed with something read. Without
        the event loop's round per read this costs about a quarter less CPU (0.45 ->
        0.33 s a GiB of chunked body, measured); waking per `receive_mark` bytes
        instead of per segment a third less again."""
        started = last = time.monotonic()
        mark = receive_mark(sock, rmem_max=_rmem_max())
        lowat = 1  # the socket's, as the transport left it
        waited = False  # the last read waited LOWAT_WAIT for the mark: take what came
        try:
            while got < len(view) and not self._body_done:
                room = len(view) - got
                if self._left is not None:
                    room = min(room, self._left)
                wanted = 1 if waited else min(mark, room)
                if wanted != lowat:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
                    lowat = wanted
                sock.settimeout(LOWAT_WAIT if lowat > 1 else PARTIAL_AFTER)
                try:
                    n = sock.recv_into(view[got:got + room])
                except TimeoutError:
                    if lowat > 1:
                        waited = True
                        continue
                    cancel.check()  # the job was stopped
                    if stop is not None and stop.is_set():
                        raise errors.TransferInterrupted("the upload was stopped") from None
                    now = time.monotonic()
                    if got and now - started >= PARTIAL_AFTER:
                        return got
                    if now - last >= self._stall_timeout:
                        raise errors.TransferStalled(
                            f"no data for {self._stall_timeout:g}s") from None
                    continue
                except OSError as e:
                    raise errors.TransferInterrupted(f"connection lost: {e}") from e
                if not n:
                    raise errors.TransferInterrupted("the client closed the connection "
                                                     "before the end of the body")
                waited = False
                last = time.monotonic()
                try:
                    got += self._body_bytes(view, got, got + n)
                except wire.HttpError as e:
                    raise errors.TransferInterrupted(f"bad chunked body: {e.message}") from e
                if last - started >= PARTIAL_AFTER:
                    break
        finally:
            if lowat != 1:
                # The transport reads this socket again after the body.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return got

    def _fill_done(self) -> None:
        self._pause()
        if self._filled is not None and not self._filled.done():
            self._filled.set_result(None)

    def _fail_body(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._body_done = True
        if self._filled is not None and not self._filled.done():
            self._filled.set_exception(error)

    def _tick_period(self) -> float:
        return min(PARTIAL_AFTER, self._stall_timeout)

    def _tick(self) -> None:
        # One timer per fill, not one per read: returns what came so far, or gives
        # up on a client that has sent nothing for the stall timeout.
        self._stall_timer = None
        if self._got:
            self._fill_done()
        elif self._loop.time() - self._last_data >= self._stall_timeout:
            self._fail_body(errors.TransferStalled(f"no data for {self._stall_timeout:g}s"))
        else:
            self._stall_timer = self._loop.call_later(self._tick_period(), self._tick)

    # --- the answer --------------------------------------------------------------------

    async def _serve(self, request: PutRequest) -> None:
        try:
            answer = await self._handler(request)
        except Exception:
            log.exception("upload door failed on PUT %s", request.path)
            answer = Reply(500, {"Content-Type": "application/json"},
                           errors_json(errors.GeneralException.code, "internal error"))
        self._answer(answer)

    def _answer(self, answer: Reply) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(wire.reply(answer.status, answer.headers, answer.body))
        if self._body_done and not self._early:
            self._close()
            return
        # The client may still be sending a body nobody will read: read and drop it
        # for a while, so it reads the answer rather than a reset.
        self._phase = _Phase.DRAIN
        self._early = b""
        # TLS transports cannot half-close: the close at the end does it.
        with contextlib.suppress(NotImplementedError, RuntimeError, OSError):
            transport.write_eof()
        self._resume()
        self._deadline = self._loop.call_later(LINGER, self._close)

    # --- the transport -----------------------------------------------------------------

    def _pause(self) -> None:
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_reading():
            self._transport.resume_reading()

    def _close(self) -> None:
        self._cancel_timers()
        self._close_sock()
        if self._transport is not None:
            self._transport.close()

    def _close_sock(self) -> None:
        if self._sock is not None:
            self._sock.close()  # our descriptor only; the transport closes its own
            self._sock = None

    def _cancel_timers(self) -> None:
        for timer in (self._deadline, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._deadline = self._stall_timer = None


def errors_json(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()
