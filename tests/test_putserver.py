"""The upload doors' server over real loopback sockets: bodies read into the
consumer's buffers, whatever the client's framing, pace and manners."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from tests.helpers import run
from vdsmlite import errors
from vdsmlite.blocking import BlockingExecutor
from vdsmlite.http import putserver
from vdsmlite.http.putserver import PutProtocol, PutRequest, Reply

pytestmark = pytest.mark.unit

BODY = random.Random(7).randbytes(300_000)


async def read_all(request: PutRequest, room: int = 8192) -> tuple[bytes, list[int]]:
    """The body as a writer takes it: fills of a fixed-size buffer."""
    buf = bytearray(room)
    out, fills = bytearray(), []
    with memoryview(buf) as view:
        while n := await request.fill(view):
            out += view[:n]
            fills.append(n)
    return bytes(out), fills


async def echo_digest(request: PutRequest) -> Reply:
    try:
        body, _ = await read_all(request)
    except errors.VdsmError as e:
        return Reply(500, {}, json.dumps({"error": type(e).__name__,
                                          "message": e.message}).encode())
    return Reply(200, {"X-Path": request.path},
                 json.dumps({"size": len(body),
                             "sha": hashlib.sha256(body).hexdigest()}).encode())


def recording_handler() -> tuple[list[PutRequest], Callable[[PutRequest], Awaitable[Reply]]]:
    """A door that answers 200 and remembers who reached it."""
    called: list[PutRequest] = []

    async def handler(request: PutRequest) -> Reply:
        called.append(request)
        return Reply(200)

    return called, handler


# How bodies are read: by the event loop (as under TLS) or by executor threads.
RECEIVER = {"threads": False}


@pytest.fixture(autouse=True, params=["event loop", "threads"])
def receiver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(RECEIVER, "threads", request.param == "threads")
    return str(request.param)


@asynccontextmanager
async def server(handler: Callable[[PutRequest], Awaitable[Reply]],
                 stall_timeout: float = 30.0) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    executor = BlockingExecutor(4)
    run_blocking = executor.run if RECEIVER["threads"] else None
    srv = await loop.create_server(
        lambda: PutProtocol(handler, stall_timeout=stall_timeout, run_blocking=run_blocking),
        "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()
        executor.shutdown()


async def exchange(port: int, pieces: list[bytes], *, pause: float = 0.0
                   ) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await read_reply(reader)
    finally:
        writer.close()


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return status, headers, body


def split(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, largest)
        out.append(data[pos:pos + n])
        pos += n
    return out


def chunked_body(data: bytes, rng: random.Random) -> bytes:
    out = bytearray()
    for piece in split(data, rng, 70_000):
        out += b"%X\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def expected(data: bytes) -> dict[str, object]:
    return {"size": len(data), "sha": hashlib.sha256(data).hexdigest()}


def test_sized_and_chunked_bodies_in_any_pieces() -> None:
    rng = random.Random(1)

    async def main() -> None:
        async with server(echo_digest) as port:
            sized = (b"PUT /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
            for largest in (1, 7, 1500, 100_000):
                pieces = split(sized[:4000], rng, largest) + split(sized[4000:], rng, 100_000)
                status, headers, body = await exchange(port, pieces)
                assert (status, headers["x-path"]) == (200, "/a")
                assert json.loads(body) == expected(BODY)
                assert headers["connection"] == "close"
            chunked = (b"PUT /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunked_body(BODY, rng))
            for largest in (3, 999, 65_536):
                status, _, body = await exchange(port, split(chunked, rng, largest))
                assert status == 200 and json.loads(body) == expected(BODY)
            # an empty body, and what follows a sized body is not part of it
            status, _, body = await exchange(
                port, [b"PUT /c HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPUT / HTTP/1.1\r\n"])
            assert status == 200 and json.loads(body) == expected(b"abc")
            status, _, body = await exchange(port, [b"PUT /d HTTP/1.0\r\n\r\n"])
            assert status == 200 and json.loads(body) == expected(b"")

    run(main())


def test_expect_continue_is_answered_only_when_the_body_is_wanted() -> None:
    async def refuse(request: PutRequest) -> Reply:
        return Reply(403, {}, b"no")

    async def main() -> None:
        head = (b"PUT /x HTTP/1.1\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\n\r\n" % len(BODY))
        async with server(echo_digest) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30) == \
                b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(BODY)
            status, _, body = await read_reply(reader)
            assert status == 200 and json.loads(body) == expected(BODY)
            writer.close()
        async with server(refuse) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            status, _, body = await read_reply(reader)  # no 100 before it
            assert (status, body) == (403, b"no")
            writer.close()

    run(main())


@pytest.mark.parametrize("request_head, status", [
    (b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"PUT / HTTP/1.1\r\nContent-Length: zorro\r\n\r\n", 400),
    (b"PUT / HTTP/1.1\r\nX: " + b"v" * (70 << 10), 431),
])
def test_refused_heads_get_an_answer_and_the_handler_never_runs(request_head: bytes,
                                                                status: int) -> None:
    called, handler = recording_handler()

    async def main() -> None:
        async with server(handler) as port:
            got, headers, body = await exchange(port, [request_head])
            assert got == status
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error"]["message"]

    run(main())
    assert not called


def test_broken_chunked_framing_mid_body_stops_the_reader() -> None:
    async def main() -> None:
        async with server(echo_digest) as port:
            raw = (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"10000\r\n" + BODY[:0x10000] + b"\r\nnot-hex\r\n")
            status, _, body = await exchange(port, [raw])
            assert status == 500
            reply = json.loads(body)
            assert reply["error"] == "TransferInterrupted"
            assert "bad chunked body: bad chunk size b'not-hex'" in reply["message"]

    run(main())


def test_a_client_that_leaves_mid_body_interrupts_the_reader() -> None:
    seen: asyncio.Queue[BaseException] = asyncio.Queue()

    async def handler(request: PutRequest) -> Reply:
        try:
            await read_all(request)
        except errors.VdsmError as e:
            seen.put_nowait(e)
        return Reply(200)

    async def main() -> None:
        async with server(handler) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + BODY[:5000])
            await writer.drain()
            writer.close()
            error = await asyncio.wait_for(seen.get(), 30)
            assert isinstance(error, errors.TransferInterrupted)

    run(main())


def test_slow_client_gets_partial_fills_then_a_stall_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A fill returns what came after PARTIAL_AFTER (progress and lease checks go on);
    # a client silent for the stall timeout is given up on.
    monkeypatch.setattr(putserver, "PARTIAL_AFTER", 0.05)
    fills: asyncio.Queue[int | BaseException] = asyncio.Queue()

    async def handler(request: PutRequest) -> Reply:
        view = memoryview(bytearray(1 << 20))
        try:
            while n := await request.fill(view):
                fills.put_nowait(n)
        except errors.VdsmError as e:
            fills.put_nowait(e)
        return Reply(200)

    async def main() -> None:
        async with server(handler, stall_timeout=0.5) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100)
            # far less than the buffer, returned anyway
            assert await asyncio.wait_for(fills.get(), 30) == 100
            writer.write(b"b" * 300)
            assert await asyncio.wait_for(fills.get(), 30) == 300
            error = await asyncio.wait_for(fills.get(), 30)  # then nothing more is sent
            assert isinstance(error, errors.TransferStalled)
            writer.close()

    run(main())


def test_a_client_pausing_below_the_low_water_mark_is_read_and_the_mark_reset() -> None:
    # Reads wait for their low-water mark only LOWAT_WAIT long: a client that pauses
    # with less than that sent is still read (no stall, nothing lost), and the socket
    # is left waking per byte again for the transport.
    marks: list[int] = []

    async def handler(request: PutRequest) -> Reply:
        body, _ = await read_all(request, room=1 << 20)
        sock = request._connection._sock  # the threads' descriptor, when they read
        if sock is not None:
            marks.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
        return Reply(200, {}, json.dumps(expected(body)).encode())

    data = random.Random(3).randbytes(700_000)
    rng = random.Random(4)

    async def main() -> None:
        async with server(handler, stall_timeout=5.0) as port:
            sized = b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(data) + data
            pieces = [sized[:400_000], sized[400_000:400_100], sized[400_100:]]
            status, _, body = await exchange(port, pieces, pause=0.05)
            assert status == 200 and json.loads(body) == expected(data)
            chunked = (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunked_body(data, rng))
            status, _, body = await exchange(port, split(chunked, rng, 300_000), pause=0.05)
            assert status == 200 and json.loads(body) == expected(data)
            # and without pauses: the last reads wait for the mark
            status, _, body = await exchange(port, [sized])
            assert status == 200 and json.loads(body) == expected(data)

    run(main())
    assert marks == ([1, 1, 1] if RECEIVER["threads"] else [])



@contextmanager
def _connected_tcp() -> Iterator[socket.socket]:
    """The accepted end of a loopback TCP connection (a body's socket)."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            yield accepted


def test_a_bodys_socket_gets_a_big_buffer_only_where_the_host_allows_it() -> None:
    # A mark larger than a quarter of the receive buffer makes the kernel clamp the
    # window to the mark (the sender waits for every read); the buffer is raised
    # (autotuning then off) only where net.core.rmem_max lets it be as big as asked.
    with _connected_tcp() as sock:
        autotuned = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert autotuned < 2 * putserver.RECEIVE_BUFFER  # a fresh socket's
        # RHEL's default rmem_max (212992): the buffer is left to the kernel
        mark = putserver.receive_mark(sock, rmem_max=212992)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == autotuned
        assert mark == min(putserver.RECEIVE_LOWAT, autotuned // 4)
        assert putserver.receive_mark(sock, rmem_max=None) == mark  # unknown: the same
    with _connected_tcp() as sock:
        mark = putserver.receive_mark(sock, rmem_max=putserver.RECEIVE_BUFFER)
        raised = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert raised >= 2 * putserver.RECEIVE_BUFFER  # the kernel doubles what is set
        assert mark == putserver.RECEIVE_LOWAT <= raised // 4
        # asked again (each buffer's fill asks): nothing changes
        assert putserver.receive_mark(sock, rmem_max=putserver.RECEIVE_BUFFER) == mark
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == raised
    with _connected_tcp() as sock:
        # a buffer someone set small stays so, and the mark fits in it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        small = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert putserver.receive_mark(sock, rmem_max=212992) == small // 4

def test_a_client_that_leaves_before_its_head_ends_is_closed() -> None:
    called, handler = recording_handler()

    async def main() -> None:
        async with server(handler) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT / HTTP/1.1\r\nContent-")
            writer.write_eof()
            # closed at once (not after the head timeout): EOF, no answer
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()

    run(main())
    assert not called
