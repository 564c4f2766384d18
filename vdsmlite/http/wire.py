"""HTTP/1.1 as the upload doors speak it: a request head, a chunked body, a reply.

Only what a PUT with a body needs, and strict about it: the upload doors
(`putserver`) read bodies straight into O_DIRECT buffers, so they parse the
request themselves rather than through aiohttp (whose request body arrives as
copied chunks). Anything ambiguous is refused rather than guessed at:
``Content-Length`` together with ``Transfer-Encoding`` (a classic request
smuggling vector), a transfer coding other than ``chunked``, folded header
lines, a bare LF where CRLF belongs.

`ChunkedDecoder` decodes a chunked body *in place*: raw bytes received into a
buffer are compacted to their data, so the body never passes through another
buffer on its way to the disk. Its common case (data and plain size lines)
runs in C (`_chunked.c`) where that was built.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus

try:
    # The decoder's common case in C (setup.py builds it where a compiler is found).
    from vdsmlite.http import _chunked
except ImportError:  # pragma: no cover - built by `pip install`, absent only by choice
    _chunked = None  # type: ignore[assignment]

# Whether `_chunked` decodes the common case (the daemon warns at start if not).
ACCELERATED = _chunked is not None

MAX_HEAD = 64 << 10  # request line and headers together
MAX_HEADERS = 100
MAX_LINE = 4096  # a chunk-size line (with extensions) or a trailer field
_SHORT_LINE = 24  # "\r\n" after a chunk's data and its successor's "<size>\r\n"

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_HEX = re.compile(rb"^[0-9A-Fa-f]{1,16}$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """A request this server refuses, with the status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, str]  # the first value of each name
    version: str
    # lower-case names; repeated fields joined with ", " as RFC 9110 5.3 allows
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def chunked(self) -> bool:
        return "transfer-encoding" in self.headers

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    @property
    def expects_continue(self) -> bool:
        return (self.version == "HTTP/1.1"
                and self.headers.get("expect", "").lower() == "100-continue")


def head_end(data: bytes | bytearray) -> int:
    """Where the head in `data` ends (after its blank line), or -1 if not yet."""
    end = data.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def parse_head(data: bytes) -> RequestHead:
    """The request head (`data` up to and including its blank line)."""
    if len(data) > MAX_HEAD:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    lines = data[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"bad request line {lines[0][:100]!r}")
    method, target, version = parts
    if not _VERSION.match(version):
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                        f"unsupported version {version[:20]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No folded lines (obsolete, and a smuggling vector), no space before the colon.
        if not colon or not _TOKEN.match(name):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad header line {line[:100]!r}")
        value = value.strip(b" \t")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise HttpError(HTTPStatus.BAD_REQUEST,
                            f"control character in header {name.decode()}")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    try:
        raw_target = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "request target is not ASCII") from None
    url = urllib.parse.urlsplit(raw_target)
    if url.scheme or url.netloc or not url.path.startswith("/"):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"bad request target {raw_target[:100]!r}")
    query: dict[str, str] = {}
    for key, text in urllib.parse.parse_qsl(url.query, keep_blank_values=True):
        query.setdefault(key, text)
    _check_framing(version.decode("ascii"), headers)
    return RequestHead(method.decode("ascii"), urllib.parse.unquote(url.path), query,
                       version.decode("ascii"), headers)


def _check_framing(version: str, headers: dict[str, str]) -> None:
    """Refuse ambiguous body framing; a repeated equal Content-Length becomes one."""
    length = headers.get("content-length")
    coding = headers.get("transfer-encoding")
    if length is not None and coding is not None:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "both Content-Length and Transfer-Encoding: the body's end is "
                        "ambiguous")
    if length is not None:
        # Repeated equal values ("42, 42") are one length (RFC 9110 8.6); others are not.
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1 or not _DIGITS.match(next(iter(values))):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length[:40]!r}")
        headers["content-length"] = next(iter(values))
    if coding is not None:
        if version != "HTTP/1.1":
            raise HttpError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding in an HTTP/1.0 request")
        if coding.strip().lower() != "chunked":
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED,
                            f"Transfer-Encoding {coding[:40]!r}: only chunked is known")


def reply(status: int, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A whole response that closes the connection after it."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _State(enum.Enum):
    SIZE = "size"          # reading a chunk-size line
    DATA = "data"          # inside a chunk's data
    DATA_END = "data-end"  # the CRLF after a chunk's data
    TRAILER = "trailer"    # trailer fields, until a blank line
    DONE = "done"


# wire._State as _chunked.c numbers the states it handles
_C_STATES = {_State.DATA: 0, _State.DATA_END: 1, _State.SIZE: 2}
_STATES_OF_C = {code: state for state, code in _C_STATES.items()}


class ChunkedDecoder:
    """Decodes a chunked body in place, whatever the boundaries of what arrives.

    `decode(buf, start, end)` takes the raw bytes at ``buf[start:end]``, moves
    their data down to begin at `start` and returns how many data bytes are
    there. Framing split across calls is carried inside the decoder, never in
    the buffer, so the caller's buffer holds body data only.
    """

    def __init__(self) -> None:
        self._state = _State.SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailers = 0

    @property
    def done(self) -> bool:
        return self._state is _State.DONE


    def decode(self, buf: memoryview, start: int, end: int) -> int:
        out = pos = start
        while pos < end and self._state is not _State.DONE:
            if _chunked is not None and not self._line and self._state in _C_STATES:
                # The common case in C: data, the CRLF after it, plain size lines.
                out, pos, code, self._remaining = _chunked.decode(
                    buf, out, pos, end, _C_STATES[self._state], self._remaining)
                self._state = _STATES_OF_C[code]
                if pos == end:
                    break
            if self._state is _State.DATA:
                take = min(self._remaining, end - pos)
                if out != pos:
                    buf[out:out + take] = buf[pos:pos + take]
                out += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _State.DATA_END
                continue
            # A framing line: nearly always a few bytes ("\r\n", "ffec\r\n"), so look
            # that far first, then as far as the longest one allowed.
            limit = min(end, pos + MAX_LINE + 2 - len(self._line))
            window = bytes(buf[pos:min(limit, pos + _SHORT_LINE)])
            newline = window.find(b"\n")
            if newline < 0 and pos + len(window) < limit:
                window = bytes(buf[pos:limit])
                newline = window.find(b"\n")
            if newline < 0:
                self._line += window
                pos += len(window)
                if len(self._line) > MAX_LINE:
                    raise HttpError(HTTPStatus.BAD_REQUEST, "chunked framing line too long")
                continue
            self._line += window[:newline + 1]
            pos += newline + 1
            line = bytes(self._line)
            self._line.clear()
            self._on_line(line)
        return out - start

    def _on_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise HttpError(HTTPStatus.BAD_REQUEST, "chunked framing: LF without CR")
        text = line[:-2]
        if self._state is _State.SIZE:
            size = text.split(b";", 1)[0].strip(b" \t")
            if not _HEX.match(size):
                raise HttpError(HTTPStatus.BAD_REQUEST, f"bad chunk size {text[:40]!r}")
            self._remaining = int(size, 16)
            self._state = _State.DATA if self._remaining else _State.TRAILER
        elif self._state is _State.DATA_END:
            if text:
                raise HttpError(HTTPStatus.BAD_REQUEST, "chunk data longer than its size")
            self._state = _State.SIZE
        elif not text:
            self._state = _State.DONE
        else:
            self._trailers += 1
            if self._trailers > MAX_HEADERS or b":" not in text:
                raise HttpError(HTTPStatus.BAD_REQUEST, "bad chunked trailer")
