"""OVF_STORE tars, validated while they stream and written without a library.

An OVF_STORE holds a plain ustar archive of ``info.json``, one
``<uuid>.ovf`` per VM/Template and ``metadata.json``. `TarValidator` consumes
such an archive in chunks of any size, keeping memory bounded by the largest
member it must inspect, and refuses - as soon as the offending bytes arrive -
anything that is not exactly that:

* headers must be ustar (POSIX or GNU magic) with a correct checksum;
* members must be regular files with flat names matching ``info.json``,
  ``metadata.json`` or ``<uuid>.ovf``, each at most once;
* no extension headers (pax, GNU long names), links, directories or devices;
* sizes within limits; every ``.ovf`` well-formed, DTD-free OVF XML (checked
  incrementally by `OvfValidator`) and every ``.json`` valid JSON;
* the archive ends with the two zero blocks, followed by nothing but zero
  padding, and fits the volume.

`TarWriter` produces such archives (for single-entity updates), and
`iter_members` reads one back member by member. `entity_id_from_name` is the
one statement of how an entity's member is named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from vdsmlite.ids import UUID_PATTERN
from vdsmlite.ovf.model import OvfError
from vdsmlite.ovf.safexml import OvfValidator
from vdsmlite.ovf.workers import AHEAD_BYTES, NamedDoc, OvfBatcher

BLOCK = 512
RECORD = 10240  # commons-compress pads archives to 20 blocks, as the engine's are
MAX_OVF_MEMBER = 32 * 1024 * 1024
MAX_JSON_MEMBER = 16 * 1024 * 1024

INFO = "info.json"
METADATA = "metadata.json"
_TYPE_NAMES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device",
               b"4": "block device", b"5": "directory", b"6": "FIFO",
               b"7": "contiguous file", b"x": "pax header", b"g": "pax global header",
               b"L": "GNU long name", b"K": "GNU long link name"}
_OVF_MEMBER = re.compile(rf"({UUID_PATTERN})\.ovf")


def entity_id_from_name(member_name: str) -> str | None:
    """``<uuid>.ovf`` (an OVF_STORE tar member) -> the lower-case uuid, else None.

    Only a bare name with the uuid in its canonical 8-4-4-4-12 form (either case) is
    accepted, so a member name can never smuggle a path.
    """
    match = _OVF_MEMBER.fullmatch(member_name)
    return match.group(1).lower() if match else None


class TarError(ValueError):
    """The stream is not an acceptable OVF_STORE archive. `too_large` -> HTTP 413."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _octal(field_bytes: bytes, what: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:
        raise TarError(f"{what}: base-256 numbers are not accepted")
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as e:
        raise TarError(f"{what}: {text[:20]!r} is not an octal number") from e


def header_checksum(header: bytes) -> int:
    """The unsigned sum POSIX defines, with the checksum field counted as spaces."""
    return sum(header[:148]) + 8 * ord(" ") + sum(header[156:])


def _signed_checksum(header: bytes) -> int:
    # Some old tars summed the bytes as signed chars; only asked for when the
    # unsigned sum does not match, so the common case stays a C-speed sum().
    blanked = header[:148] + b" " * 8 + header[156:]
    return sum(b - 256 if b > 127 else b for b in blanked)


@dataclass(frozen=True)
class Header:
    name: str
    size: int


def parse_header(block: bytes, offset: int) -> Header:
    """Validate one 512-byte header; `offset` only makes error messages precise."""
    where = f"header at byte {offset}"
    stored = _octal(block[148:156], f"{where}: checksum")
    if stored != header_checksum(block) and stored != _signed_checksum(block):
        raise TarError(f"{where}: bad checksum")
    magic, version = block[257:263], block[263:265]
    if not (magic == b"ustar\0" and version == b"00") and \
            not (magic == b"ustar " and version == b" \0"):
        raise TarError(f"{where}: not a ustar header")
    typeflag = block[156:157]
    if typeflag not in (b"0", b"\0"):
        kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
        raise TarError(f"{where}: {kind} members are not allowed")
    if block[345:500].strip(b"\0"):
        raise TarError(f"{where}: names with a directory prefix are not allowed")
    raw_name = block[:100].split(b"\0", 1)[0]
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError as e:
        raise TarError(f"{where}: non-ASCII member name") from e
    if name not in (INFO, METADATA) and entity_id_from_name(name) is None:
        raise TarError(f"{where}: member name {name[:100]!r} is not info.json, "
                       "metadata.json or <uuid>.ovf")
    size = _octal(block[124:136], f"{where}: size")
    limit = MAX_OVF_MEMBER if name.endswith(".ovf") else MAX_JSON_MEMBER
    if size > limit:
        raise TarError(f"{where}: {name} is {size} bytes, more than {limit}", too_large=True)
    return Header(name, size)


class _JsonMember:
    def __init__(self, name: str) -> None:
        self.name = name
        self.parts: list[bytes] = []

    def feed(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    @property
    def raw(self) -> bytes:
        return b"".join(self.parts)

    def close(self) -> Any:
        try:
            return json.loads(self.raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise TarError(f"{self.name}: invalid JSON: {str(e)[:200]}") from e


# Hands a batch of (member name, document) to be XML-checked elsewhere; the future
# fails with an error naming the first bad member.
CheckBatch = Callable[[list[NamedDoc]], "Future[None]"]


class _OvfMember:
    """An ``.ovf`` member: XML-checked as it streams, or whole by `checks`."""

    def __init__(self, name: str, keep: bool, validate_xml: bool,
                 checks: OvfBatcher[None] | None) -> None:
        self.name = name
        self.checks = checks if validate_xml else None
        self.validator = OvfValidator() if validate_xml and checks is None else None
        self.keep = keep
        self.parts: list[bytes] | None = [] if keep or self.checks is not None else None

    def feed(self, data: bytes | memoryview) -> None:
        chunk = bytes(data)
        if self.validator is not None:
            try:
                self.validator.feed(chunk)
            except OvfError as e:
                raise TarError(f"{self.name}: {e}") from e
        if self.parts is not None:
            self.parts.append(chunk)

    def close(self) -> bytes | None:
        if self.validator is not None:
            try:
                self.validator.close()
            except OvfError as e:
                raise TarError(f"{self.name}: {e}") from e
        if self.parts is None:
            return None
        whole = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        if self.checks is not None:
            try:
                self.checks.add(self.name, whole)
            except OvfError as e:
                # Not prefixed with this member's name: the error names the bad
                # member, which may be an earlier one of the same batch.
                raise TarError(str(e)) from e
        return whole if self.keep else None


@dataclass
class ArchiveSummary:
    members: list[Header] = field(default_factory=list)
    info: Any = None
    metadata: Any = None
    ovfs: dict[str, bytes] = field(default_factory=dict)  # only when keep_ovfs
    end: int = 0  # offset just past the end-of-archive marker

    @property
    def entity_ids(self) -> list[str]:
        return [m.name[:-4].lower() for m in self.members if m.name.endswith(".ovf")]


_HEADER, _DATA, _PAD, _END2, _TRAILER = range(5)


class TarValidator:
    """Push-based validation of an OVF_STORE tar (see the module docstring)."""

    def __init__(self, max_total: int, *, keep_ovfs: bool = False,
                 on_member: Callable[[str, bytes], None] | None = None,
                 validate_xml: bool = True, check_xml: CheckBatch | None = None,
                 check_ahead: int = AHEAD_BYTES) -> None:
        """`validate_xml=False` is only for readers that fully parse every ``.ovf``
        they are handed (with the same safe parser), which checks it anyway.
        `check_xml` checks whole ``.ovf`` members elsewhere (worker processes)
        instead of here as they stream, at most `check_ahead` bytes behind."""
        self.max_total = max_total
        self._checks = (OvfBatcher(check_xml, ahead_bytes=check_ahead)
                        if check_xml is not None and validate_xml else None)
        self.keep_ovfs = keep_ovfs or on_member is not None
        self.on_member = on_member
        self.validate_xml = validate_xml
        self.total = 0
        self.summary = ArchiveSummary()
        self._state = _HEADER
        self._block = bytearray()
        self._remaining = 0
        self._member: _JsonMember | _OvfMember | None = None
        self._current: Header | None = None
        self._seen: set[str] = set()

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self.total + len(view) > self.max_total:
            raise TarError(f"archive is larger than the volume ({self.max_total} bytes)",
                           too_large=True)
        pos = 0
        n = len(view)
        while pos < n:
            if self._state == _DATA:
                take = min(self._remaining, n - pos)
                assert self._member is not None
                self._member.feed(view[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._finish_member()
                continue
            if self._state == _TRAILER:
                rest = view[pos:]
                if any(rest):
                    raise TarError(f"data after the end-of-archive marker (byte "
                                   f"{self.total + pos})")
                pos = n
                continue
            if self._state == _PAD:
                take = min(self._remaining, n - pos)
                if any(view[pos:pos + take]):
                    # Padding is zeros; anything else is a member longer than it declared.
                    raise TarError(f"{self._current.name if self._current else 'member'}: "
                                   "data longer than its declared size")
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEADER
                continue
            # _HEADER or _END2: collect a whole block
            take = min(BLOCK - len(self._block), n - pos)
            self._block += view[pos:pos + take]
            pos += take
            if len(self._block) == BLOCK:
                self._on_block(self.total + pos - BLOCK)
        self.total += n

    def _on_block(self, offset: int) -> None:
        block = bytes(self._block)
        self._block.clear()
        zero = not any(block)
        if self._state == _END2:
            if not zero:
                raise TarError(f"incomplete end-of-archive marker at byte {offset}")
            self.summary.end = offset + BLOCK
            self._state = _TRAILER
            return
        if zero:
            self._state = _END2
            return
        header = parse_header(block, offset)
        key = header.name.lower()
        if key in self._seen:
            raise TarError(f"duplicate member {header.name}")
        self._seen.add(key)
        self._current = header
        self.summary.members.append(header)
        if header.name.endswith(".json"):
            self._member = _JsonMember(header.name)
        else:
            self._member = _OvfMember(header.name, self.keep_ovfs, self.validate_xml,
                                      self._checks)
        self._remaining = header.size
        self._state = _DATA
        if header.size == 0:
            self._finish_member()

    def _finish_member(self) -> None:
        assert self._member is not None and self._current is not None
        result = self._member.close()
        name = self._current.name
        if name == INFO:
            self.summary.info = result
        elif name == METADATA:
            self.summary.metadata = result
        elif result is not None and self.on_member is None:
            self.summary.ovfs[name[:-4].lower()] = result
        if self.on_member is not None:
            # Members are handed on byte for byte, never re-serialized.
            member = self._member
            raw = member.raw if isinstance(member, _JsonMember) else result
            assert raw is not None
            self.on_member(name, raw)
        self._member = None
        pad = -self._current.size % BLOCK
        self._remaining = pad
        self._state = _PAD if pad else _HEADER

    def finish(self) -> ArchiveSummary:
        """The archive must be complete: end marker seen, nothing left half-read,
        every member checked."""
        if self._checks is not None:
            # Before the truncation checks: a bad member that came first is the error.
            try:
                self._checks.finish()
            except OvfError as e:
                raise TarError(str(e)) from e
        if self._state in (_DATA, _PAD):
            raise TarError("archive truncated inside a member")
        if self._state != _TRAILER:
            raise TarError("archive has no end-of-archive marker (truncated?)")
        return self.summary

    def abandon(self) -> None:
        """The stream failed elsewhere: drop the checks still queued."""
        if self._checks is not None:
            self._checks.cancel()


# --- writing ------------------------------------------------------------------------


def make_header(name: str, size: int, mtime: int) -> bytes:
    block = bytearray(BLOCK)
    block[0:len(name)] = name.encode("ascii")
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = f"{mtime:011o}\0".encode()
    block[156:157] = b"0"
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


class TarWriter:
    """Emit an archive as chunks: members, end marker, padding to a full record."""

    def __init__(self, mtime: int) -> None:
        self.mtime = mtime
        self.length = 0

    def member(self, name: str, data: bytes) -> Iterator[bytes]:
        yield make_header(name, len(data), self.mtime)
        yield data
        pad = -len(data) % BLOCK
        if pad:
            yield b"\0" * pad
        self.length += BLOCK + len(data) + pad

    def end(self) -> Iterator[bytes]:
        tail = 2 * BLOCK
        tail += -(self.length + tail) % RECORD
        self.length += tail
        yield b"\0" * tail


def iter_members(chunks: Iterable[bytes], max_total: int) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every member of a valid archive, validating as it goes."""
    found: list[tuple[str, bytes]] = []

    def keep(name: str, data: bytes) -> None:
        found.append((name, data))

    validator = TarValidator(max_total, on_member=keep)
    for chunk in chunks:
        validator.feed(chunk)
        yield from found
        found.clear()
    validator.finish()
