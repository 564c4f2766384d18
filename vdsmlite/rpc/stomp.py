"""STOMP 1.2 frames: a streaming parser with limits and an encoder (no I/O).

A frame is ``COMMAND\\n`` + ``key:value\\n``* + ``\\n`` + body + ``\\0``. Header
names and values are escaped per STOMP 1.2 (``\\c`` ``\\n`` ``\\r`` ``\\\\``);
the first occurrence of a repeated header wins; lines may end in ``\\r\\n``. A
bare EOL between frames is a heart-beat. The body ends after
``content-length`` bytes (which must be followed by NUL) or, without that
header, at the first NUL.

The parser never holds more than the limits allow:

* the command line and each header line: `max_line` bytes;
* headers per frame: `max_headers`;
* the body: `max_body` bytes. A body above it is *skipped* (streamed through,
  never buffered) and reported as an `Oversized` frame carrying the frame's
  headers, so a server can answer an oversized request instead of dropping
  the connection. Only the tail of such a body is kept (`Oversized.tail`), in
  which the request id of a JSON-RPC request usually is.

Anything else malformed raises `FrameError`, whose message is what the
server puts in its ``ERROR`` frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Client and server commands of STOMP 1.2 (VDSM's list, plus STOMP and the ACK verbs).
CLIENT_COMMANDS = ("CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK",
                   "BEGIN", "COMMIT", "ABORT", "DISCONNECT")
SERVER_COMMANDS = ("CONNECTED", "MESSAGE", "RECEIPT", "ERROR")
COMMANDS = frozenset(CLIENT_COMMANDS + SERVER_COMMANDS)

HEARTBEAT = b"\n"

MAX_LINE = 8192
MAX_HEADERS = 64
TAIL = 256

_DECODE = {b"\\\\": "\\", b"\\r": "\r", b"\\n": "\n", b"\\c": ":"}
_ESCAPE_RE = re.compile(rb"\\.?")
_ENCODE_RE = re.compile(r"[\r\n\\:]")
_ENCODE = {":": "\\c", "\\": "\\\\", "\r": "\\r", "\n": "\\n"}


class FrameError(Exception):
    """The peer sent something that is not a STOMP 1.2 frame; the connection must go."""


@dataclass
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def encode(self) -> bytes:
        return encode(self.command, self.headers, self.body)


@dataclass
class Oversized:
    """A frame whose body exceeded the limit: its headers, its size, its last bytes."""

    command: str
    headers: dict[str, str]
    size: int
    tail: bytes


def _unescape(raw: bytes) -> str:
    def sub(m: re.Match[bytes]) -> bytes:
        try:
            return _DECODE[m.group(0)].encode()
        except KeyError:
            raise FrameError(f"invalid escape sequence {m.group(0)!r} in header") from None

    if b"\\" in raw:
        raw = _ESCAPE_RE.sub(sub, raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("header is not valid UTF-8") from None


def escape(value: str) -> str:
    if not any(c in value for c in "\r\n\\:"):
        return value
    return _ENCODE_RE.sub(lambda m: _ENCODE[m.group(0)], value)


def encode(command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """One frame, always with ``content-length`` (as VDSM sends them)."""
    parts = [command, "\n"]
    for key, value in (headers or {}).items():
        if key == "content-length":
            continue
        parts += [escape(key), ":", escape(str(value)), "\n"]
    parts += ["content-length:", str(len(body)), "\n\n"]
    return "".join(parts).encode() + body + b"\0"


class Parser:
    """Feed bytes in any chunks; get frames (and `Oversized` reports) out, in order."""

    _COMMAND, _HEADERS, _BODY, _SKIP = range(4)

    def __init__(self, max_body: int, max_line: int = MAX_LINE,
                 max_headers: int = MAX_HEADERS) -> None:
        self.max_body = max_body
        self.max_line = max_line
        self.max_headers = max_headers
        self._buf = bytearray()
        self._state = self._COMMAND
        self._command = ""
        self._headers: dict[str, str] = {}
        self._nheaders = 0
        self._length = -1
        self._skipped = 0
        self._tail = b""
        self.heartbeats = 0

    @property
    def mid_frame(self) -> bool:
        """True while a frame has begun but is not complete (for stall timeouts)."""
        return self._state != self._COMMAND or bool(self._buf)

    def feed(self, data: bytes) -> list[Frame | Oversized]:
        self._buf += data
        out: list[Frame | Oversized] = []
        while True:
            if self._state == self._COMMAND:
                line = self._line()
                if line is None:
                    return out
                if not line:
                    self.heartbeats += 1
                    continue
                command = line.decode("ascii", "replace")
                if command not in COMMANDS:
                    raise FrameError(f"Unknown command {command[:32]!r}")
                self._command = command
                self._headers = {}
                self._nheaders = 0
                self._state = self._HEADERS
            elif self._state == self._HEADERS:
                line = self._line()
                if line is None:
                    return out
                if line:
                    self._header(line)
                    continue
                self._length = self._content_length()
                if self._length > self.max_body:
                    self._skipped, self._tail = 0, b""
                    self._state = self._SKIP
                else:
                    self._state = self._BODY
            elif self._state == self._BODY:
                frame = self._body()
                if frame is None:
                    return out
                out.append(frame)
                self._state = self._COMMAND
            else:
                report = self._skip()
                if report is None:
                    return out
                out.append(report)
                self._state = self._COMMAND

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\n", 0, self.max_line + 2)
        if end < 0:
            if len(self._buf) > self.max_line:
                what = "command" if self._state == self._COMMAND else "header"
                raise FrameError(f"{what} line longer than {self.max_line} bytes")
            return None
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            raise FrameError(f"header line longer than {self.max_line} bytes")
        return line

    def _header(self, line: bytes) -> None:
        self._nheaders += 1
        if self._nheaders > self.max_headers:
            raise FrameError(f"more than {self.max_headers} headers")
        key, sep, value = line.partition(b":")
        if not sep:
            raise FrameError(f"header without ':': {line[:64]!r}")
        # First occurrence wins (STOMP 1.2).
        self._headers.setdefault(_unescape(key), _unescape(value))

    def _content_length(self) -> int:
        text = self._headers.get("content-length")
        if text is None:
            return -1
        if not text.isdigit():
            raise FrameError(f"invalid content-length {text[:32]!r}")
        return int(text)

    def _body(self) -> Frame | None:
        n = self._length
        if n >= 0:
            if len(self._buf) < n + 1:
                return None
            if self._buf[n] != 0:
                raise FrameError("Frame doesn't end with NULL byte")
        else:
            n = self._buf.find(b"\0", 0, self.max_body + 1)
            if n < 0:
                if len(self._buf) > self.max_body:
                    # No content-length and no NUL within the limit: skip the rest.
                    self._skipped, self._tail = 0, b""
                    self._state = self._SKIP
                    return self._skip()  # type: ignore[return-value]
                return None
        body = bytes(self._buf[:n])
        del self._buf[:n + 1]
        return Frame(self._command, self._headers, body)

    def _skip(self) -> Oversized | None:
        if self._length >= 0:
            want = self._length - self._skipped
            if len(self._buf) <= want:
                self._eat(len(self._buf))
                return None
            self._eat(want)
            if self._buf[0] != 0:
                raise FrameError("Frame doesn't end with NULL byte")
            del self._buf[:1]
        else:
            end = self._buf.find(b"\0")
            if end < 0:
                self._eat(len(self._buf))
                return None
            self._eat(end)
            del self._buf[:1]
        return Oversized(self._command, self._headers, self._skipped, self._tail)

    def _eat(self, n: int) -> None:
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._skipped += n
        self._tail = (self._tail + chunk)[-TAIL:]


def parse_heartbeat(value: str | None) -> tuple[int, int]:
    """``cx,cy`` as VDSM reads it: anything unparsable counts as 0."""
    if not value:
        return 0, 0
    first, sep, second = value.partition(",")
    if not sep:
        return 0, 0

    def num(text: str) -> int:
        try:
            return max(int(text.strip()), 0)
        except ValueError:
            return 0

    return num(first), num(second)


def negotiate_heartbeat(value: str | None) -> tuple[int, int]:
    """VDSM's rule: the client's ``cx,cy`` with non-zero values raised to 1000 ms.

    Returns ``(send_every, expect_every)`` in ms for the server: it sends every
    ``cy`` and expects the client every ``cx``; the CONNECTED header is ``cy,cx``.
    """
    cx, cy = parse_heartbeat(value)
    if cx:
        cx = max(cx, 1000)
    if cy:
        cy = max(cy, 1000)
    return cy, cx
