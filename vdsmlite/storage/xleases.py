"""The ``xleases`` volume: VDSM's external (VM and job) leases, byte for byte.

A domain's ``xleases`` volume (a file in ``dom_md``, an LV on block) is cut in
slots of one sanlock alignment unit (1 MiB at 512-byte sectors; 1-8 MiB at 4K):

    slot 0              lockspace (unused: the domain's lockspace is in ``ids``)
    slot 1              the index: which lease id lives in which slot
    slot 2              reserved for sanlock's own use (never written by VDSM)
    slot 3 + recnum     the sanlock resource (paxos lease) of index record recnum

The index (VDSM's xlease.py, INDEX_VERSION 1) is ``INDEX_SIZE`` bytes at the
start of slot 1: a 512-byte metadata block, then 64-byte records. A lease's
offset is computed from its record number, never read from the record (the
offset field is there for humans), so two records can never share a slot.
The first 512 bytes stay 512 on 4K storage too, so old volumes stay readable.

Changes follow VDSM's order, so a crash at any step leaves a state VDSM reads
the same way:

* add: write the sanlock resource, then the record (one block, O_DIRECT and
  fsync). A crash in between leaves a resource with no record: the lease does
  not exist; adding it again reuses the slot; a rebuild clears the leftover.
* remove: clear the record, then overwrite the resource with empty names
  (failure there is only logged: the index is the truth).
* format and rebuild mark the index *updating* first and clear the flag last;
  a crash leaves an index that refuses to load (IndexIsUpdating) until it is
  rebuilt or formatted.
* records with the legacy *updating* flag (written by old VDSM versions around
  an add) are treated as missing leases by lookup, and reused by add.

Everything here blocks (direct I/O and sanlock calls): run it off the loop.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any

from vdsmlite import errors, failpoints
from vdsmlite.locking import sanlock
from vdsmlite.storage import directio

log = logging.getLogger("vdsmlite.storage.xleases")

# Slots 0..2: lockspace, index, sanlock's reserved slot.
RESERVED_SLOTS = 3
# The metadata block; 512 even on 4K storage (VDSM keeps old volumes readable).
METADATA_SIZE = 512
RECORD_BASE = METADATA_SIZE
RECORD_SIZE = 64
# 62 * 4096: VDSM's old 4000-record index rounded down to a 4K multiple.
INDEX_SIZE = 62 * 4096
MAX_RECORDS = (INDEX_SIZE - METADATA_SIZE) // RECORD_SIZE  # 3960
INDEX_VERSION = 1
INDEX_MAGIC = 0x12152016

# magic \0 version \0 lockspace \0 mtime \0 updating \0 * 440 \n  (big endian magic)
META_STRUCT = struct.Struct(">i x 4s x 48s x 10s x c 440x c")
# lease_id \0 offset \0 updating reserved \n
RECORD_STRUCT = struct.Struct("48s x 11s x 3c")
# What find looks for: the id, NUL-padded to 48 bytes, then the separator NUL.
LOOKUP_STRUCT = struct.Struct("48s x")

TERM = b"\n"
FLAG_NONE = b"-"
FLAG_UPDATING = b"u"

assert META_STRUCT.size == METADATA_SIZE and RECORD_STRUCT.size == RECORD_SIZE


def lease_offset(recnum: int, alignment: int) -> int:
    """Where record `recnum`'s sanlock resource lives in the volume."""
    return (RESERVED_SLOTS + recnum) * alignment


# --- the on-disk structures -------------------------------------------------------------


@dataclass(frozen=True)
class IndexMetadata:
    version: int
    lockspace: str
    mtime: int
    updating: bool = False

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexMetadata:
        try:
            magic, version, lockspace, mtime, updating, _ = META_STRUCT.unpack(data)
        except struct.error as e:
            raise errors.InvalidIndexMetadata(f"cannot unpack: {e}", data) from e
        if magic != INDEX_MAGIC:
            raise errors.InvalidIndexMetadata(f"invalid magic: {magic}", data)
        try:
            version_n = int(version)
        except ValueError:
            raise errors.InvalidIndexMetadata(f"invalid version: {version!r}", data) from None
        if version_n != INDEX_VERSION:
            raise errors.InvalidIndexMetadata(f"unsupported version {version_n}", data)
        try:
            name = lockspace.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise errors.InvalidIndexMetadata(f"cannot decode lockspace {lockspace!r}",
                                              data) from None
        try:
            mtime_n = int(mtime)
        except ValueError:
            raise errors.InvalidIndexMetadata(f"cannot parse mtime {mtime!r}", data) from None
        return cls(version_n, name, mtime_n, updating == FLAG_UPDATING)

    def to_bytes(self) -> bytes:
        return META_STRUCT.pack(INDEX_MAGIC, b"%04d" % self.version,
                                self.lockspace.encode("ascii"), b"%010d" % self.mtime,
                                FLAG_UPDATING if self.updating else FLAG_NONE, TERM)


@dataclass(frozen=True)
class Record:
    resource: str  # the lease id; "" in a free record
    offset: int  # informational only: the true offset comes from the record number
    updating: bool = False

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        try:
            resource, offset, updating, _, _ = RECORD_STRUCT.unpack(data)
        except struct.error as e:
            raise errors.InvalidRecord(f"cannot unpack: {e}", data) from e
        resource = resource.rstrip(b"\0")
        try:
            name = resource.decode("ascii")
        except UnicodeDecodeError:
            raise errors.InvalidRecord(f"cannot decode resource {resource!r}", data) from None
        try:
            offset_n = int(offset)
        except ValueError:
            raise errors.InvalidRecord(f"cannot parse offset {offset!r}", data) from None
        return cls(name, offset_n, updating == FLAG_UPDATING)

    def to_bytes(self) -> bytes:
        return RECORD_STRUCT.pack(self.resource.encode("ascii"), b"%011d" % self.offset,
                                  FLAG_UPDATING if self.updating else FLAG_NONE, FLAG_NONE,
                                  TERM)

    @property
    def is_empty(self) -> bool:
        return self.resource == ""


EMPTY_RECORD = Record("", 0)


@dataclass(frozen=True)
class LeaseInfo:
    """Where a lease lives: what sanlock (or libvirt's <lease>) needs to acquire it."""

    lockspace: str  # the domain UUID
    resource: str  # the lease id
    path: str  # the xleases file, or the activated xleases LV's device
    offset: int


# --- I/O ----------------------------------------------------------------------------------


def _read_index(path: str, alignment: int, block_size: int) -> bytearray:
    data = directio.read(path, alignment, INDEX_SIZE, block_size)
    if len(data) < INDEX_SIZE:
        raise errors.TruncatedIndex(INDEX_SIZE, len(data))
    return bytearray(data)


def _write(path: str, offset: int, data: bytes | bytearray, block_size: int) -> None:
    # O_DIRECT + fsync: when this returns the bytes are on shared storage.
    directio.write(path, offset, bytes(data), block_size)


def volume_size(path: str) -> int:
    """Bytes in the volume (a file's size, or a block device's)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class _NoSuchResource(Exception):
    """No live sanlock resource at an offset (never written, cleared, or emptied)."""


def _read_resource(path: str, offset: int, alignment: int, block_size: int) -> sanlock.Resource:
    try:
        res = sanlock.read_resource(path, offset, align=alignment, sector=block_size)
    except sanlock.SanlockError as e:
        if e.errno != sanlock.SANLK_LEADER_MAGIC:
            raise
        raise _NoSuchResource() from None
    if res.name == "":
        raise _NoSuchResource()  # a removed lease: VDSM writes empty names over it
    return res


def _write_resource(lockspace: str, name: str, path: str, offset: int, *, alignment: int,
                    block_size: int) -> None:
    log.info("writing sanlock resource %r (lockspace %r) at %s:%d", name, lockspace, path,
             offset)
    sanlock.write_resource(lockspace, name, [(path, offset)], align=alignment,
                           sector=block_size)


def _clear_resource(path: str, offset: int, alignment: int, block_size: int) -> None:
    # sanlock cannot delete a resource; VDSM overwrites it with empty names.
    _write_resource("", "", path, offset, alignment=alignment, block_size=block_size)


# --- the index in memory ------------------------------------------------------------------


class _Index:
    """INDEX_SIZE bytes of the index slot, and their records."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    @staticmethod
    def record_offset(recnum: int) -> int:
        return RECORD_BASE + recnum * RECORD_SIZE

    def metadata(self) -> IndexMetadata:
        return IndexMetadata.from_bytes(bytes(self.buf[:METADATA_SIZE]))

    def set_metadata(self, md: IndexMetadata) -> None:
        self.buf[:METADATA_SIZE] = md.to_bytes()

    def find(self, lease_id: str) -> int:
        """The record number holding `lease_id`, or -1."""
        return self._find(LOOKUP_STRUCT.pack(lease_id.encode("ascii")))

    def find_free(self) -> int:
        return self._find(EMPTY_RECORD.to_bytes())

    def _find(self, needle: bytes) -> int:
        # Only matches that start a record count (an id cannot straddle records,
        # but a corrupted one could make a misaligned match).
        pos = self.buf.find(needle, RECORD_BASE)
        while pos != -1:
            if (pos - RECORD_BASE) % RECORD_SIZE == 0:
                return (pos - RECORD_BASE) // RECORD_SIZE
            pos = self.buf.find(needle, pos + 1)
        return -1

    def record(self, recnum: int) -> Record:
        off = self.record_offset(recnum)
        return Record.from_bytes(bytes(self.buf[off:off + RECORD_SIZE]))

    def set_record(self, recnum: int, record: Record) -> None:
        off = self.record_offset(recnum)
        self.buf[off:off + RECORD_SIZE] = record.to_bytes()

    def block_of(self, recnum: int, block_size: int) -> tuple[int, bytearray]:
        """(offset in the index, copy) of the block holding record `recnum`."""
        off = self.record_offset(recnum)
        start = off - off % block_size
        return start, bytearray(self.buf[start:start + block_size])


def _validate_lease_id(lease_id: str) -> None:
    raw = lease_id.encode("ascii", errors="replace")
    if not raw or len(raw) > 48 or b"\0" in raw or not lease_id.isascii():
        raise errors.InvalidParameterException("lease_id", lease_id)


class LeasesVolume:
    """A loaded xleases index; changes go to storage at once (one block each).

    The index is read when this is built and not again: build one per operation,
    under the domain's SDM lease for changes.
    """

    def __init__(self, path: str, *, alignment: int, block_size: int) -> None:
        self.path = path
        self.alignment = alignment
        self.block_size = block_size
        self._index = _Index(_read_index(path, alignment, block_size))
        self._md = self._index.metadata()
        if self._md.updating:
            raise errors.IndexIsUpdating(repr(self._md))

    @property
    def lockspace(self) -> str:
        return self._md.lockspace

    @property
    def metadata(self) -> IndexMetadata:
        return self._md

    def lookup(self, lease_id: str) -> LeaseInfo:
        """NoSuchLease (936) if absent, or only half-added by an old VDSM (updating)."""
        _validate_lease_id(lease_id)  # a longer id would match its 48-byte prefix
        recnum = self._index.find(lease_id)
        if recnum == -1 or self._index.record(recnum).updating:
            raise errors.NoSuchLease(lease_id)
        return LeaseInfo(self.lockspace, lease_id, self.path,
                         lease_offset(recnum, self.alignment))

    def add(self, lease_id: str) -> LeaseInfo:
        """Create the lease: its sanlock resource, then its record.

        LeaseExists if it is there; NoSpace if every record is used. A record left
        *updating* by an old VDSM is taken over (its resource is rewritten).
        """
        _validate_lease_id(lease_id)
        recnum = self._index.find(lease_id)
        if recnum != -1:
            record = self._index.record(recnum)
            if not record.updating:
                raise errors.LeaseExists(lease_id)
            log.warning("taking over lease %s left updating in record %d", lease_id, recnum)
        else:
            recnum = self._index.find_free()
            if recnum == -1:
                raise errors.XleasesNoSpace(lease_id)
        offset = lease_offset(recnum, self.alignment)
        if not self._fits(offset):
            raise errors.XleasesNoSpace(lease_id)
        # 1. The resource first: if this fails, the index is unchanged.
        _write_resource(self.lockspace, lease_id, self.path, offset,
                        alignment=self.alignment, block_size=self.block_size)
        # A crash here leaves a resource no record names: no lease (see module doc).
        failpoints.hit("xleases.add.after_resource")
        # 2. The record makes the lease exist.
        self._write_record(recnum, Record(lease_id, offset))
        log.info("added lease %s in lockspace %s at offset %d", lease_id, self.lockspace,
                 offset)
        return LeaseInfo(self.lockspace, lease_id, self.path, offset)

    def remove(self, lease_id: str) -> None:
        """NoSuchLease (936) if absent; the record goes first, then the resource."""
        _validate_lease_id(lease_id)
        recnum = self._index.find(lease_id)
        if recnum == -1:
            raise errors.NoSuchLease(lease_id)
        offset = lease_offset(recnum, self.alignment)
        self._write_record(recnum, EMPTY_RECORD)
        try:
            _clear_resource(self.path, offset, self.alignment, self.block_size)
        except sanlock.SanlockError as e:
            # The index no longer names it: the lease is gone; a rebuild clears it.
            log.warning("lease %s removed, but its resource at %d was not cleared: %s",
                        lease_id, offset, e)
        log.info("removed lease %s from lockspace %s", lease_id, self.lockspace)

    def leases(self) -> dict[str, dict[str, Any]]:
        """Every used record: {lease_id: {offset, updating}} (dump); bad records skipped."""
        out: dict[str, dict[str, Any]] = {}
        for recnum in range(MAX_RECORDS):
            try:
                record = self._index.record(recnum)
            except errors.InvalidRecord as e:
                log.warning("skipping bad xleases record %d: %s", recnum, e)
                continue
            if record.resource:
                out[record.resource] = {"offset": lease_offset(recnum, self.alignment),
                                        "updating": record.updating}
        return out

    def _fits(self, offset: int) -> bool:
        # A file grows as sanlock writes a resource; an LV (1024 slots) does not, and
        # the index has room for more records than that (VDSM lets sanlock fail there).
        if stat.S_ISREG(os.stat(self.path).st_mode):
            return True
        return offset + self.alignment <= volume_size(self.path)

    def _write_record(self, recnum: int, record: Record) -> None:
        """Write the record's block to storage, then to the copy in memory (so memory
        never claims what storage does not hold)."""
        start, block = self._index.block_of(recnum, self.block_size)
        rel = self._index.record_offset(recnum) - start
        block[rel:rel + RECORD_SIZE] = record.to_bytes()
        _write(self.path, self.alignment + start, block, self.block_size)
        self._index.set_record(recnum, record)


# --- whole-index operations -----------------------------------------------------------------


def _finish_update(index: _Index, lockspace: str, path: str, alignment: int,
                   block_size: int) -> None:
    """Clear the updating flag: the first block, written last."""
    index.set_metadata(IndexMetadata(INDEX_VERSION, lockspace, int(time.time())))
    _write(path, alignment, index.buf[:block_size], block_size)


def format_index(lockspace: str, path: str, *, alignment: int, block_size: int,
                 max_records: int = MAX_RECORDS) -> None:
    """Write an empty index (every record free). Destroys the lease index: only for a
    new domain, or a volume that never had one. `max_records` is for tests only."""
    log.info("formatting the xleases index of %s at %s", lockspace, path)
    index = _Index(bytearray(INDEX_SIZE))
    index.set_metadata(IndexMetadata(INDEX_VERSION, lockspace, int(time.time()),
                                     updating=True))
    for recnum in range(max_records):
        index.set_record(recnum, EMPTY_RECORD)
    # The whole index, still marked updating: a crash now leaves a refused index.
    _write(path, alignment, index.buf, block_size)
    _finish_update(index, lockspace, path, alignment, block_size)


def is_unformatted(path: str, *, alignment: int, block_size: int) -> bool:
    """True if the index slot was never written: an xleases volume made before this
    agent formatted one (a file too short for it, or a metadata block of zeros).
    A corrupted index is *not* unformatted: it needs a rebuild, never a format."""
    data = directio.read(path, alignment, METADATA_SIZE if block_size == 512 else block_size,
                         block_size)
    return len(data) < METADATA_SIZE or not any(data[:METADATA_SIZE])


def rebuild_index(lockspace: str, path: str, *, alignment: int, block_size: int) -> None:
    """Make the index and the sanlock resources agree, as VDSM's rebuild_index does.

    The index is the truth where it can be read: a record without a resource gets one
    again, a resource under a free record is a leftover and is cleared, a resource
    under a record naming another lease is rewritten. Where a record cannot be read,
    the resource found in its slot (if no other record names it) restores it. An
    index left updating by a crash is accepted and comes out clean. Metadata that cannot be read
    (InvalidIndexMetadata) is refused: that needs a format.
    """
    log.info("rebuilding the xleases index of %s at %s", lockspace, path)
    index = _Index(_read_index(path, alignment, block_size))
    md = index.metadata()  # refuses a corrupted metadata block
    log.info("xleases index before rebuild: %s", md)
    # As VDSM: marked updating in memory only; storage keeps the old index until the
    # new one is written whole (still updating), then the flag is cleared.
    index.set_metadata(IndexMetadata(INDEX_VERSION, lockspace, int(time.time()),
                                     updating=True))

    max_offset = volume_size(path) - alignment
    for recnum in range(MAX_RECORDS):
        offset = lease_offset(recnum, alignment)
        if offset > max_offset:
            # Past the end of the volume: no lease can live there.
            index.set_record(recnum, EMPTY_RECORD)
            continue
        try:
            res: sanlock.Resource | None = _read_resource(path, offset, alignment, block_size)
        except _NoSuchResource:
            res = None
        try:
            record: Record | None = index.record(recnum)
        except errors.InvalidRecord as e:
            log.warning("xleases record %d is corrupted: %s", recnum, e)
            record = None

        if record is None:
            if res is not None and index.find(res.name) == -1:
                log.info("restoring record %d for lease %s from its resource", recnum,
                         res.name)
                index.set_record(recnum, Record(res.name, offset))
            else:
                index.set_record(recnum, EMPTY_RECORD)
                if res is not None:
                    log.info("clearing leftover resource %s at %d", res.name, offset)
                    _clear_resource(path, offset, alignment, block_size)
        elif record.is_empty:
            if res is not None:
                log.info("clearing leftover resource %s at %d", res.name, offset)
                _clear_resource(path, offset, alignment, block_size)
        elif res is None or res.name != record.resource:
            log.info("rewriting the resource of lease %s at %d", record.resource, offset)
            _write_resource(lockspace, record.resource, path, offset, alignment=alignment,
                            block_size=block_size)

    _write(path, alignment, index.buf, block_size)
    _finish_update(index, lockspace, path, alignment, block_size)
    log.info("xleases index of %s rebuilt", lockspace)
