"""OVF_STORE tars, checked while they stream, at memory speed, and written without a library.

An OVF_STORE holds a plain ustar archive of ``info.json``, one
``<uuid>.ovf`` per VM/Template and ``metadata.json``. `TarValidator` consumes
such an archive in buffers of any size and refuses - as soon as the offending
bytes arrive - anything that is not exactly that:

* headers must be ustar (POSIX or GNU magic) with a correct checksum;
* members must be regular files with flat names matching ``info.json``,
  ``metadata.json`` or ``<uuid>.ovf``, each at most once;
* no extension headers (pax, GNU long names), links, directories or devices;
* sizes within limits, and every ``.json`` valid JSON;
* no ``.ovf`` may hold XML that can hurt a parser: DTD markup (``<!DOCTYPE``,
  ``<!ENTITY``: XXE, billion laughs) is refused in UTF-8 and UTF-16 alike, and so
  is a declared or detected encoding other than UTF-8 or UTF-16;
* the archive ends with the two zero blocks, followed by nothing but zero
  padding, and fits the volume.

What it does not do by default is parse the XML: a VM definition that is not
well-formed is the engine's data to keep, reported by the index built after the
commit, not a reason to refuse every other VM's definition with it. Callers
that want every ``.ovf`` parsed before anything is committed pass `check_xml`
(the ``?check=xml`` of the upload doors).

The validator costs a little Python per *member*, never per 512-byte block:
member boundaries come from arithmetic on the headers, and the DTD scan is a
``memchr`` for ``!`` over whole buffers (a well-formed OVF rarely has one; each
found is judged from the two bytes around it). Buffers are searched in place,
so the upload's O_DIRECT buffers are never copied for it.

`TarWriter` produces such archives (for single-entity updates), and
`iter_members` reads one back member by member. `entity_id_from_name` is the
one statement of how an entity's member is named.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import xxhash

from vdsmlite.ids import UUID_PATTERN, UUID_RE
from vdsmlite.ovf.batches import AHEAD_BYTES, NamedDoc, OvfBatcher
from vdsmlite.ovf.model import OvfError

try:
    # The hot loop in C (setup.py builds it where a compiler is found); the same
    # checks run in Python without it.
    from vdsmlite.ovf import _tarscan
except ImportError:  # pragma: no cover - built by `pip install`, absent only by choice
    _tarscan = None  # type: ignore[assignment]

# Whether `_tarscan` runs the hot loop (the daemon logs it at start).
ACCELERATED = _tarscan is not None

BLOCK = 512
RECORD = 10240  # commons-compress pads archives to 20 blocks, as the engine's are
MAX_OVF_MEMBER = 32 * 1024 * 1024
MAX_JSON_MEMBER = 16 * 1024 * 1024
# Where the index of a store may be split between parser processes: the first member
# header at or after every SPLIT_BYTES of archive.
SPLIT_BYTES = 2 * 1024 * 1024

INFO = "info.json"
METADATA = "metadata.json"
_TYPE_NAMES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device",
               b"4": "block device", b"5": "directory", b"6": "FIFO",
               b"7": "contiguous file", b"x": "pax header", b"g": "pax global header",
               b"L": "GNU long name", b"K": "GNU long link name"}
_OVF_MEMBER = re.compile(rf"({UUID_PATTERN})\.ovf")

_OVF_NAME_BYTES = re.compile(rf"{UUID_PATTERN}\.ovf".encode())
_ID_LEN = 36
_DECLARATIONS_KEPT = 8  # as many as _tarscan.c compares
_MAGICS = (b"ustar\x0000", b"ustar  \0")
_REGULAR = (0x30, 0)  # typeflag "0" or NUL: a regular file

# A buffer the validator can search in place: bytes, or the writer's mmap buffers.
Buffer = bytes | bytearray | mmap.mmap


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
    text = field_bytes.split(b"\0", 1)[0]
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as e:
        raise TarError(f"{what}: {text[:20]!r} is not an octal number") from e


def header_checksum(header: bytes) -> int:
    """The unsigned sum POSIX defines, with the checksum field counted as spaces."""
    # Headers end in zeros (the prefix and padding fields): summing them is wasted.
    return sum(header.rstrip(b"\0")) - sum(header[148:156]) + 8 * ord(" ")


def _signed_checksum(header: bytes) -> int:
    # Some old tars summed the bytes as signed chars; only asked for when the
    # unsigned sum does not match, so the common case stays a C-speed sum().
    blanked = header[:148] + b" " * 8 + header[156:]
    return sum(b - 256 if b > 127 else b for b in blanked)


def _is_octal(digits: bytes) -> bool:
    # isdigit() alone let an 8 or a 9 through to int(..., 8): a ValueError, not a
    # TarError, out of the hot loop.
    return bool(digits) and not digits.strip(b"01234567")


class Header(NamedTuple):
    name: str
    size: int


def _number(field_bytes: bytes, what: str, offset: int) -> int:
    # What writers put there nearly always: octal digits, then a NUL (or a space).
    # isdigit() first: int() alone would also take signs, spaces and underscores.
    text = field_bytes.split(b"\0", 1)[0]
    if text.isdigit():
        try:
            return int(text, 8)
        except ValueError:
            pass  # an 8 or a 9: _octal says so
    return _octal(field_bytes, f"header at byte {offset}: {what}")


def parse_header(block: bytes, offset: int) -> Header:
    """Validate one 512-byte header; `offset` only makes error messages precise."""
    stored = _number(block[148:156], "checksum", offset)
    if stored != header_checksum(block) and stored != _signed_checksum(block):
        raise TarError(f"header at byte {offset}: bad checksum")
    if block[257:265] not in _MAGICS:
        raise TarError(f"header at byte {offset}: not a ustar header")
    typeflag = block[156:157]
    if typeflag not in (b"0", b"\0"):
        kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
        raise TarError(f"header at byte {offset}: {kind} members are not allowed")
    if block[345:500].strip(b"\0"):
        raise TarError(f"header at byte {offset}: names with a directory prefix are not "
                       "allowed")
    raw_name = block[:100].split(b"\0", 1)[0]
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError as e:
        raise TarError(f"header at byte {offset}: non-ASCII member name") from e
    if name not in (INFO, METADATA) and _OVF_MEMBER.fullmatch(name) is None:
        raise TarError(f"header at byte {offset}: member name {name[:100]!r} is not "
                       "info.json, metadata.json or <uuid>.ovf")
    size = _number(block[124:136], "size", offset)
    limit = MAX_OVF_MEMBER if name.endswith(".ovf") else MAX_JSON_MEMBER
    if size > limit:
        raise TarError(f"header at byte {offset}: {name} is {size} bytes, more than {limit}",
                       too_large=True)
    return Header(name, size)


# --- what an .ovf may not hold -------------------------------------------------------------

# "<!" starts a comment ("<!--"), a CDATA section ("<![CDATA[") or DTD markup
# (DOCTYPE, ENTITY, ELEMENT, ATTLIST, NOTATION). Only the first two may appear.
_MARKUP_ALLOWED = (b"-", b"[")
_DTD_REFUSED = "DTD markup (<!DOCTYPE>, <!ENTITY>) is not allowed in an OVF"
# An XML declaration is within the first bytes; what is read of each member to find it.
_HEAD_BYTES = 256
_DECLARED_ENCODING = re.compile(
    rb"""^<\?xml\s[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]{1,40})["']""")
_UTF8_NAMES = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_UTF16_NAMES = frozenset({"utf-16", "utf16", "utf-16le", "utf-16be", "ucs-2"})


def _refuses_markup(before: bytes, after: bytes) -> bool:
    """Is the "!" between `before` (up to 2 bytes) and `after` (up to 2) the start of
    DTD markup? In UTF-8 it follows "<"; in UTF-16, either byte order, "<" and a NUL
    precede it and a NUL and the next character follow. `after` is short only at
    the member's end, where nothing can follow."""
    if before[-1:] == b"<":
        following = after[:1]
    elif before[-2:] == b"<\0":
        following = after[1:2] if after[:1] == b"\0" else after[:1]
    else:
        return False
    return bool(following) and following not in _MARKUP_ALLOWED


def check_encoding(head: bytes) -> str | None:
    """Why a document starting with `head` is refused for its encoding, or None.

    Only UTF-8 (with its ASCII subset) and UTF-16 are accepted: the DTD scan knows
    how "<!" looks in those, and the engine writes UTF-8. The encoding is detected
    as XML 1.0 Appendix F does, then the declaration must agree with it.
    """
    first4 = head[:4]
    if first4 in (b"\0\0\xfe\xff", b"\xff\xfe\0\0", b"\0\0\0<", b"<\0\0\0", b"\0\0<\0",
                  b"\0<\0\0"):
        return "UTF-32 (UCS-4) documents are not accepted"
    if first4 == b"\x4c\x6f\xa7\x94":
        return "EBCDIC documents are not accepted"
    utf16 = None
    if head[:2] == b"\xff\xfe" or first4 == b"<\0?\0":
        utf16 = "utf-16-le"
    elif head[:2] == b"\xfe\xff" or first4 == b"\0<\0?":
        utf16 = "utf-16-be"
    if utf16 is not None:
        text = head[:len(head) & ~1].decode(utf16, errors="replace").lstrip("\ufeff")
        decl = text.encode("ascii", errors="replace")
        allowed = _UTF16_NAMES
    else:
        decl = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
        allowed = _UTF8_NAMES
    match = _DECLARED_ENCODING.match(decl)
    if match is None:
        return None
    declared = match.group(1).decode("ascii").lower()
    if declared not in allowed:
        return (f"declared encoding {declared!r} is not accepted (UTF-8 or UTF-16 "
                f"{'bytes' if utf16 else 'declaration'} expected)")
    return None


# Verdicts on XML declarations seen: an archive's members nearly all start alike.
_verdicts: dict[bytes, str | None] = {}


def _check_head(name: str, head: bytes) -> None:
    """Refuse a member whose first bytes declare or show an encoding not accepted."""
    decl_end = head.find(b"?>")
    decl = head[:decl_end] if decl_end > 0 else head
    try:
        why = _verdicts[decl]
    except KeyError:
        why = check_encoding(head)
        if decl_end > 0 and len(_verdicts) < 64:
            _verdicts[decl] = why
    if why is not None:
        raise TarError(f"{name}: {why}")


def _scan_whole(name: str, buf: bytes | mmap.mmap, start: int, end: int, hit: int) -> None:
    """The DTD scan of a member lying wholly in `buf[start:end]`, from its first "!"."""
    while hit != -1:
        if _refuses_markup(buf[max(start, hit - 2):hit], buf[hit + 1:min(end, hit + 3)]):
            raise TarError(f"{name}: {_DTD_REFUSED}")
        hit = buf.find(b"!", hit + 1, end)


class _Member:
    """The member being read: what is checked and kept of its data."""

    __slots__ = ("carry", "head", "is_ovf", "name", "parts", "seen", "size")

    def __init__(self, name: str, size: int, keep: bool) -> None:
        self.name = name
        self.size = size
        self.is_ovf = name.endswith(".ovf")
        self.parts: list[bytes] | None = [] if keep or not self.is_ovf else None
        self.head = b""   # the first _HEAD_BYTES (the XML declaration)
        self.carry = b""  # the last 4 bytes of data seen, for the DTD scan's seams
        self.seen = 0

    def data(self) -> bytes:
        assert self.parts is not None
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    def take(self, buf: Buffer, start: int, end: int) -> None:
        """Data `buf[start:end]` of this member, in order."""
        if self.parts is not None:
            self.parts.append(bytes(buf[start:end]))
        if self.is_ovf:
            if len(self.head) < _HEAD_BYTES:
                self.head += buf[start:min(end, start + _HEAD_BYTES - len(self.head))]
                if len(self.head) == _HEAD_BYTES:
                    self._check_head()
            self._scan(buf, start, end)
        self.seen += end - start

    def close(self) -> None:
        if self.is_ovf:
            if len(self.head) < _HEAD_BYTES:
                self._check_head()
            # "!"s whose following bytes never came: judged with what there is.
            self._judge_window(self.carry, final=True)

    def _check_head(self) -> None:
        _check_head(self.name, self.head)

    def _scan(self, buf: Buffer, start: int, end: int) -> None:
        # The seam: the last bytes before this slice and its first ones, so a "!" near
        # either edge is judged with the two bytes on each side of it.
        self._judge_window(self.carry + bytes(buf[start:min(end, start + 4)]), final=False)
        find = buf.find
        hit = find(b"!", start + 2, end - 2)
        while hit != -1:
            if _refuses_markup(bytes(buf[hit - 2:hit]), bytes(buf[hit + 1:hit + 3])):
                raise TarError(f"{self.name}: {_DTD_REFUSED}")
            hit = find(b"!", hit + 1, end - 2)
        if end - start >= 4:
            self.carry = bytes(buf[end - 4:end])
        else:
            self.carry = (self.carry + bytes(buf[start:end]))[-4:]

    def _judge_window(self, window: bytes, *, final: bool) -> None:
        hit = window.find(b"!")
        while hit != -1:
            after = window[hit + 1:hit + 3]
            # Judged once the two bytes after are here (or never will be); before the
            # member's start there is nothing, so a short `before` is all there is.
            if (final or len(after) == 2) and _refuses_markup(window[max(0, hit - 2):hit],
                                                              after):
                raise TarError(f"{self.name}: {_DTD_REFUSED}")
            hit = window.find(b"!", hit + 1)


# Hands a batch of (member name, document) to be XML-checked elsewhere; the future
# fails with an error naming the first bad member.
CheckBatch = Callable[[list[NamedDoc]], "Future[None]"]


@dataclass
class ArchiveSummary:
    info: Any = None
    metadata: Any = None
    # The entity ids in archive order: runs of them as `_tarscan.scan` gives them (one
    # bytes object of 36 characters each, no object per member) and single ones.
    id_runs: list[bytes | str] = field(default_factory=list, repr=False)
    # Offsets of member headers where the archive may be split for indexing: the
    # first member, then the first header after every SPLIT_BYTES.
    splits: list[int] = field(default_factory=list)
    members_end: int = 0  # offset of the end-of-archive marker
    end: int = 0  # offset just past the end-of-archive marker
    # XXH3-128 of every byte fed, padding included (what the store's Size covers), as
    # hex; with `digest`. What an index kept on disk is checked against (`sdm.ovfindex`).
    digest: str | None = None

    @property
    def entity_ids(self) -> list[str]:
        """Lower case, in archive order."""
        out: list[str] = []
        for run in self.id_runs:
            if isinstance(run, str):
                out.append(run)
            else:
                text = run.decode("ascii")
                out += (text[i:i + _ID_LEN] for i in range(0, len(text), _ID_LEN))
        return out

    @property
    def entity_count(self) -> int:
        return sum(1 if isinstance(run, str) else len(run) // _ID_LEN
                   for run in self.id_runs)


_HEADER, _DATA, _PAD, _END2, _TRAILER = range(5)


class TarValidator:
    """Push-based validation of an OVF_STORE tar (see the module docstring)."""

    def __init__(self, max_total: int, *,
                 on_member: Callable[[str, bytes], None] | None = None,
                 check_xml: CheckBatch | None = None,
                 check_ahead: int = AHEAD_BYTES, digest: bool = False) -> None:
        """`on_member(name, data)` is handed every member, byte for byte. `check_xml`
        parses whole ``.ovf`` members elsewhere (worker processes) - refusing any that
        is not a well-formed OVF Envelope - at most `check_ahead` bytes behind.
        `digest`: compute `ArchiveSummary.digest`."""
        self.max_total = max_total
        self._checks = (OvfBatcher(check_xml, ahead_bytes=check_ahead)
                        if check_xml is not None else None)
        self.on_member = on_member
        self._keep = on_member is not None or check_xml is not None
        self._fast = not self._keep  # no member kept: whole ones take _whole_members
        # XXH3 rather than zlib's crc32: 0.05 s of CPU per GiB here against 0.26 (the
        # system's zlib has no carry-less multiply), cheap enough for every upload to
        # pay - which spares reading the whole store back to index it.
        self._digest = xxhash.xxh3_128() if digest else None
        self._declaration: bytes | None = None  # the last one checked (see _whole_members)
        # XML declarations found acceptable, newest first (the C loop takes members
        # beginning with any of them)
        self._declarations: tuple[bytes, ...] = ()
        self.total = 0
        self.summary = ArchiveSummary()
        self._state = _HEADER
        self._partial = bytearray()  # a header or end block split between buffers
        self._remaining = 0
        self._member: _Member | None = None
        # Member keys seen (entity ids of .ovf members, names of others), for
        # duplicates: the ids in `_tarscan`'s table when it runs, the rest here.
        self._ids = _tarscan.IdTable(os.urandom(16)) if _tarscan is not None else None
        self._seen: set[str] = set()
        self._next_split = 0

    def feed(self, data: Buffer | memoryview, length: int | None = None) -> None:
        """The next `length` bytes of the archive (all of `data` by default). A
        memoryview is copied once; bytes and mmaps are searched in place."""
        buf = data if isinstance(data, (bytes, mmap.mmap)) else bytes(data)
        n = len(buf) if length is None else length
        if self.total + n > self.max_total:
            raise TarError(f"archive is larger than the volume ({self.max_total} bytes)",
                           too_large=True)
        if self._digest is not None:  # xxhash releases the GIL for this
            with memoryview(buf) as view, view[:n] as fed:
                self._digest.update(fed)
        pos = 0
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                assert self._member is not None
                self._member.take(buf, pos, pos + take)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._finish_member()
            elif state in (_HEADER, _END2):
                if not self._partial and n - pos >= BLOCK:
                    if state == _HEADER and self._fast:
                        # The common case, whole members in this buffer: no state
                        # machine, no per-member object.
                        after = self._whole_members(buf, pos, n)
                        if after != pos:
                            pos = after
                            continue
                    self._on_block(buf[pos:pos + BLOCK], self.total + pos)
                    pos += BLOCK
                else:
                    take = min(BLOCK - len(self._partial), n - pos)
                    self._partial += buf[pos:pos + take]
                    pos += take
                    if len(self._partial) == BLOCK:
                        block = bytes(self._partial)
                        self._partial.clear()
                        self._on_block(block, self.total + pos - BLOCK)
            elif state == _PAD:
                take = min(self._remaining, n - pos)
                if buf[pos:pos + take].strip(b"\0"):
                    # Padding is zeros; anything else is a member longer than it declared.
                    name = self._member.name if self._member else "member"
                    raise TarError(f"{name}: data longer than its declared size")
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._member = None
                    self._state = _HEADER
            else:  # _TRAILER
                if buf[pos:n].strip(b"\0"):
                    raise TarError(f"data after the end-of-archive marker (byte "
                                   f"{self.total + pos})")
                pos = n
        self.total += n

    def _whole_members(self, buf: bytes | mmap.mmap, pos: int, n: int) -> int:
        """Check the ``.ovf`` members lying wholly within `buf[:n]` from `pos` on, as
        many as there are in a row; returns where the first one it left begins (a
        member cut by the buffer's end, a ``.json``, the end marker, anything odd -
        all for the general path, which also says what is wrong).

        With `_tarscan`, C walks the ordinary members without the GIL and stops at
        any other; `_python_members` checks that one (and may accept it: one with
        an XML declaration not seen yet), then C goes on.
        """
        if self._ids is None:  # no _tarscan
            return self._python_members(buf, pos, n)
        while True:
            stop, ids, splits, self._next_split = _tarscan.scan(
                buf, pos, n, MAX_OVF_MEMBER, self._declarations, self._ids, self.total,
                self._next_split, SPLIT_BYTES)
            if ids:
                self.summary.id_runs.append(ids)
                self.summary.splits += splits
            after = self._python_members(buf, stop, n, limit=1)
            if after == stop:
                return stop
            pos = after

    def _first_sight(self, key: str) -> bool:
        """Whether no member with this key (lower case) came before; now one has."""
        if self._ids is not None and UUID_RE.fullmatch(key):
            return _tarscan.id_add(self._ids, key)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _python_members(self, buf: bytes | mmap.mmap, pos: int, n: int,
                        limit: int = -1) -> int:
        """`_whole_members` in Python, for `limit` members at most (-1: no limit).

        One turn per member: everything is inlined and each check is one C call. The
        checksum is summed by adler32, whose low half is 1 + the byte sum mod 65521 -
        exact for each 256-byte half of a header.
        """
        adler = zlib.adler32
        find = buf.find
        match_name = _OVF_NAME_BYTES.fullmatch
        first_sight = self._first_sight
        ids = self.summary.id_runs
        splits = self.summary.splits
        declaration = self._declaration
        total = self.total
        while limit and pos + BLOCK <= n and buf[pos]:
            limit -= 1
            header = buf[pos:pos + BLOCK]
            # Numbers end in NUL or space, as writers please (the engine's commons-compress
            # ends the size with a space): both are stripped.
            stored = header[148:156].split(b"\0", 1)[0].strip(b" ")
            if not _is_octal(stored) or header[257:265] not in _MAGICS or \
                    header[156] not in _REGULAR or header.count(0, 345, 500) != 155:
                break
            computed = (adler(header[:256]) & 0xFFFF) + (adler(header[256:]) & 0xFFFF) - 2 \
                - sum(header[148:156]) + 256
            name = header[:header.find(0, 0, 100)]
            size_field = header[124:136].split(b"\0", 1)[0].strip(b" ")
            if computed != int(stored, 8) or match_name(name) is None or \
                    not _is_octal(size_field):
                break
            size = int(size_field, 8)
            start = pos + BLOCK
            end = start + size
            padded = end + (-size % BLOCK)
            if padded > n or size > MAX_OVF_MEMBER or not size:
                break
            key = name.decode("ascii").lower()
            if not first_sight(key[:-4]):
                break  # a duplicate: the general path reports it
            if total + pos >= self._next_split:
                splits.append(total + pos)
                self._next_split = total + pos + SPLIT_BYTES
            ids.append(key[:-4])
            if declaration is None or buf[start:start + len(declaration)] != declaration:
                declaration = self._check_declaration(key, buf[start:min(end,
                                                                         start + _HEAD_BYTES)])
            hit = find(b"!", start, end)
            if hit != -1:
                _scan_whole(key, buf, start, end, hit)
            if padded > end and buf[end:padded].strip(b"\0"):
                raise TarError(f"{key}: data longer than its declared size")
            pos = padded
        self._declaration = declaration
        return pos

    def _check_declaration(self, name: str, head: bytes) -> bytes | None:
        """Check a member's first bytes (`check_encoding`); returns its XML declaration
        when it has one, which the next members are likely to share."""
        _check_head(name, head)
        end = head.find(b"?>")
        if end <= 0:
            return None
        declaration = head[:end + 2]
        if declaration not in self._declarations:
            self._declarations = (declaration, *self._declarations)[:_DECLARATIONS_KEPT]
        return declaration

    def _on_block(self, block: bytes, offset: int) -> None:
        zero = not block.strip(b"\0")
        if self._state == _END2:
            if not zero:
                raise TarError(f"incomplete end-of-archive marker at byte {offset}")
            self.summary.end = offset + BLOCK
            self._state = _TRAILER
            return
        if zero:
            self.summary.members_end = offset
            self._state = _END2
            return
        header = parse_header(block, offset)
        key = header.name.lower()
        if key.endswith(".ovf"):
            key = key[:-4]  # the entity id is a .ovf member's key
        if not self._first_sight(key):
            raise TarError(f"duplicate member {header.name}")
        if offset >= self._next_split:
            self.summary.splits.append(offset)
            self._next_split = offset + SPLIT_BYTES
        if header.name.endswith(".ovf"):
            self.summary.id_runs.append(key)
        self._member = _Member(header.name, header.size, self._keep)
        self._remaining = header.size
        self._state = _DATA
        if header.size == 0:
            self._finish_member()

    def _finish_member(self) -> None:
        member = self._member
        assert member is not None
        member.close()
        if member.parts is not None:
            data = member.data()
            if member.name == INFO:
                self.summary.info = _json(member.name, data)
            elif member.name == METADATA:
                self.summary.metadata = _json(member.name, data)
            elif self._checks is not None:
                try:
                    self._checks.add(member.name, data)
                except OvfError as e:
                    # Not prefixed with this member's name: the error names the bad
                    # member, which may be an earlier one of the same batch.
                    raise TarError(str(e)) from e
            if self.on_member is not None:
                self.on_member(member.name, data)  # byte for byte, never re-serialized
        pad = -member.size % BLOCK
        self._remaining = pad
        if pad:
            self._state = _PAD
        else:
            self._member = None
            self._state = _HEADER

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
        if self._digest is not None:
            self.summary.digest = self._digest.hexdigest()
        return self.summary

    def abandon(self) -> None:
        """The stream failed elsewhere: drop the checks still queued."""
        if self._checks is not None:
            self._checks.cancel()


def _json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise TarError(f"{name}: invalid JSON: {str(e)[:200]}") from e


# --- writing ------------------------------------------------------------------------


def make_header(name: str, size: int, mtime: int) -> bytes:
    """A ustar header laid out as the engine's writer (commons-compress
    ``TarArchiveEntry``/``TarUtils``) lays out its numbers: mode as 6 digits, space,
    NUL; uid, gid as 7 digits and a space; size, mtime as 11 digits and a space;
    the checksum as 6 digits, NUL, space."""
    block = bytearray(BLOCK)
    block[0:len(name)] = name.encode("ascii")
    block[100:108] = b"100644 \0"
    block[108:116] = b"0000000 "
    block[116:124] = b"0000000 "
    block[124:136] = f"{size:011o} ".encode()
    block[136:148] = f"{mtime:011o} ".encode()
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
