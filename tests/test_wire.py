"""The upload doors' HTTP/1.1: request heads and the in-place chunked decoder."""

from __future__ import annotations

import mmap
import random

import pytest

from tests.helpers import c_and_python
from vdsmlite.http import wire
from vdsmlite.http.wire import ChunkedDecoder, HttpError, parse_head

pytestmark = pytest.mark.unit


# Every test runs with the C common case (`_chunked`) and without it.
decoder_loop = c_and_python(wire, "_chunked")


def chunked(pieces: list[bytes], *, ext: bool = False, trailers: bytes = b"") -> bytes:
    out = b""
    for piece in pieces:
        size = b"%x" % len(piece)
        out += size + (b";name=value" if ext else b"") + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n" + trailers + b"\r\n"


def decode_in(raw: bytes, reads: list[int], room: int = 1 << 16) -> bytes:
    """Feed `raw` as a transport would: each read lands right after the data decoded
    so far, in one buffer; returns the buffer's data."""
    buf = mmap.mmap(-1, room)
    decoder = ChunkedDecoder()
    got = pos = 0
    with memoryview(buf) as view:
        for n in reads:
            view[got:got + n] = raw[pos:pos + n]
            got += decoder.decode(view, got, got + n)
            pos += n
        assert decoder.done and pos == len(raw)
        data = bytes(view[:got])
    buf.close()
    return data


BODY = [bytes([i]) * n for i, n in enumerate([1, 15, 16, 255, 4096, 3, 1000])]
RAW = chunked(BODY, ext=True, trailers=b"X-Checksum: abc\r\n")


def test_every_split_point_of_every_framing_line() -> None:
    expected = b"".join(BODY)
    for cut in range(1, len(RAW)):
        assert decode_in(RAW, [cut, len(RAW) - cut]) == expected, cut


def test_byte_by_byte_and_random_reads() -> None:
    expected = b"".join(BODY)
    assert decode_in(RAW, [1] * len(RAW)) == expected
    rng = random.Random(14)
    for _ in range(200):
        reads, left = [], len(RAW)
        while left:
            reads.append(min(left, rng.randint(1, 700)))
            left -= reads[-1]
        assert decode_in(RAW, reads) == expected


def test_bytes_after_the_last_chunk_are_not_body() -> None:
    raw = chunked([b"abc"])
    buf = bytearray(64)
    view = memoryview(buf)
    view[:len(raw) + 5] = raw + b"GET /"
    decoder = ChunkedDecoder()
    assert decoder.decode(view, 0, len(raw) + 5) == 3 and decoder.done
    assert bytes(view[:3]) == b"abc"


@pytest.mark.parametrize("raw, why", [
    (b"3\nabc\r\n0\r\n\r\n", "LF without CR"),
    (b"zz\r\nabc\r\n0\r\n\r\n", "bad chunk size"),
    (b"-3\r\nabc\r\n0\r\n\r\n", "bad chunk size"),
    (b"3\r\nabcd\r\n0\r\n\r\n", "longer than its size"),
    (b"1" * 5000 + b"\r\n", "too long"),
    (b"11111111111111111\r\n", "bad chunk size"),  # beyond 64 bits
    (b"0\r\nno colon\r\n\r\n", "trailer"),
])
def test_broken_framing_is_refused(raw: bytes, why: str) -> None:
    buf = memoryview(bytearray(len(raw)))
    buf[:] = raw
    with pytest.raises(HttpError, match=why) as e:
        ChunkedDecoder().decode(buf, 0, len(raw))
    assert e.value.status == 400


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_a_head_as_the_engine_and_curl_send_it() -> None:
    h = parse_head(head("PUT /ovfstore/abc?check=xml&wait=index&check=other HTTP/1.1",
                        "Host: x", "Transfer-Encoding: chunked", "Expect: 100-continue",
                        "X-Repeated: a", "x-repeated: b"))
    assert (h.method, h.path, h.version) == ("PUT", "/ovfstore/abc", "HTTP/1.1")
    assert h.query == {"check": "xml", "wait": "index"}  # the first of each name
    assert h.chunked and h.content_length is None and h.expects_continue
    assert h.headers["x-repeated"] == "a, b"
    h = parse_head(head("PUT /%6Fvfstore HTTP/1.0", "Content-Length: 42, 42"))
    assert h.path == "/ovfstore" and h.content_length == 42 and not h.expects_continue


@pytest.mark.parametrize("lines, status, why", [
    (["PUT / HTTP/1.1", "Content-Length: 1", "Transfer-Encoding: chunked"], 400, "ambiguous"),
    (["PUT / HTTP/1.1", "Transfer-Encoding: gzip, chunked"], 501, "only chunked"),
    (["PUT / HTTP/1.0", "Transfer-Encoding: chunked"], 400, "HTTP/1.0"),
    (["PUT / HTTP/1.1", "Content-Length: zorro"], 400, "Content-Length"),
    (["PUT / HTTP/1.1", "Content-Length: 1, 2"], 400, "Content-Length"),
    (["PUT / HTTP/1.1", "Content-Length: -1"], 400, "Content-Length"),
    (["PUT / HTTP/1.1", "Host: x", " folded"], 400, "bad header line"),
    (["PUT / HTTP/1.1", "Bad Name: x"], 400, "bad header line"),
    (["PUT / HTTP/1.1", "Host : x"], 400, "bad header line"),
    (["PUT / HTTP/1.1", "X: a\x00b"], 400, "control character"),
    (["PUT / HTTP/2.0"], 505, "version"),
    (["PUT /  HTTP/1.1"], 400, "request line"),
    (["PUT http://elsewhere/ HTTP/1.1"], 400, "request target"),
    (["PUT relative HTTP/1.1"], 400, "request target"),
])
def test_refused_heads(lines: list[str], status: int, why: str) -> None:
    with pytest.raises(HttpError, match=why) as e:
        parse_head(head(*lines))
    assert e.value.status == status


def test_head_limits() -> None:
    with pytest.raises(HttpError) as e:
        parse_head(head("PUT / HTTP/1.1", *[f"X-{i}: v" for i in range(101)]))
    assert e.value.status == 431
    with pytest.raises(HttpError) as e:
        parse_head(head("PUT / HTTP/1.1", "X: " + "v" * (64 << 10)))
    assert e.value.status == 431


def decode_outcome(raw: bytes, reads: list[int]) -> object:
    try:
        return decode_in(raw, reads, room=len(raw) + 16)
    except HttpError as e:
        return ("refused", e.status, e.message)
    except AssertionError:
        return "incomplete"


def test_c_and_python_decoders_agree_on_mutated_bodies(
        decoder_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The C common case stops at anything unusual and Python takes over: the two
    # together must decode (or refuse) exactly as Python alone, however the reads fall.
    if decoder_loop == "python":
        pytest.skip("compares the two decoders once")
    rng = random.Random(2014)
    alphabet = b"0123456789abcdefABCDEF\r\n;= xZ\0"
    for case in range(400):
        pieces = [rng.randbytes(rng.choice([1, 2, 15, 16, 17, 300])) for _ in range(5)]
        raw = bytearray(chunked(pieces, ext=case % 5 == 0,
                                trailers=b"X: y\r\n" if case % 3 == 0 else b""))
        if case % 4 == 0:  # upper-case sizes and leading zeros
            raw = bytearray(bytes(raw).replace(b"\r\n1\r\n", b"\r\n0001\r\n"))
        for _ in range(rng.choice([0, 1, 2])):
            raw[rng.randrange(len(raw))] = rng.choice(alphabet)
        data = bytes(raw)
        reads, left = [], len(data)
        while left:
            reads.append(min(left, rng.choice([1, 3, 7, 64, 1000])))
            left -= reads[-1]
        with_c = decode_outcome(data, reads)
        monkeypatch.setattr(wire, "_chunked", None)
        in_python = decode_outcome(data, reads)
        monkeypatch.undo()
        assert with_c == in_python, case
