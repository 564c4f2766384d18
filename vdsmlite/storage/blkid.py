"""Signatures on block devices, read in-process through libblkid (cffi, ABI mode).

Whether a LUN is free or used depends on what its first blocks hold: an LVM
label, a partition table, a filesystem, a RAID member. libblkid is what udev
and `blkid` use to recognise all of those; calling it directly lets
`Host.getDeviceList` probe hundreds of LUNs in parallel threads without one
subprocess per device (and `blkid -p` stops at the first device that carries
nothing, so it cannot probe many devices in one call).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cffi

_CDEF = """
typedef struct blkid_struct_probe *blkid_probe;
blkid_probe blkid_new_probe_from_filename(const char *filename);
void blkid_free_probe(blkid_probe pr);
int blkid_probe_enable_superblocks(blkid_probe pr, int enable);
int blkid_probe_set_superblocks_flags(blkid_probe pr, int flags);
int blkid_probe_enable_partitions(blkid_probe pr, int enable);
int blkid_do_safeprobe(blkid_probe pr);
int blkid_probe_lookup_value(blkid_probe pr, const char *name, const char **data, size_t *len);
"""

# blkid.h
_SUBLKS_TYPE = 1 << 5
_SUBLKS_USAGE = 1 << 7


@dataclass(frozen=True)
class Signature:
    """What libblkid found at the start of a device; all None means blank."""

    type: str | None = None  # filesystem / LVM2_member / linux_raid_member / swap ...
    usage: str | None = None  # filesystem, raid, crypto, other
    pttype: str | None = None  # dos, gpt ...
    ambiguous: bool = False  # several signatures at once (e.g. a stale fs under a PV)

    @property
    def blank(self) -> bool:
        return self.type is None and self.pttype is None and not self.ambiguous


class ProbeError(Exception):
    pass


@functools.cache
def _lib() -> tuple[Any, Any]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen("libblkid.so.1")


def probe(path: str) -> Signature:
    """Probe one device (blocking: a few small reads). Raises ProbeError if unreadable."""
    ffi, lib = _lib()
    pr = lib.blkid_new_probe_from_filename(path.encode())
    if pr == ffi.NULL:
        raise ProbeError(f"cannot open {path} for probing")
    try:
        lib.blkid_probe_enable_superblocks(pr, 1)
        lib.blkid_probe_set_superblocks_flags(pr, _SUBLKS_TYPE | _SUBLKS_USAGE)
        lib.blkid_probe_enable_partitions(pr, 1)
        rc = lib.blkid_do_safeprobe(pr)
        if rc == -1:
            raise ProbeError(f"probing {path} failed")
        if rc == -2:
            return Signature(ambiguous=True)
        if rc == 1:
            return Signature()

        def value(name: str) -> str | None:
            data = ffi.new("const char **")
            if lib.blkid_probe_lookup_value(pr, name.encode(), data, ffi.NULL) != 0:
                return None
            return ffi.string(data[0]).decode(errors="replace")

        return Signature(type=value("TYPE"), usage=value("USAGE"), pttype=value("PTTYPE"))
    finally:
        lib.blkid_free_probe(pr)
