"""What is mounted where: /proc/self/mountinfo, parsed."""

from __future__ import annotations

import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \040 \011 \012 \134.
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    devnum: tuple[int, int]
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount options (rw,noatime,...)
    super_options: str  # filesystem options


def parse(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        major, _, minor = f[2].partition(":")
        mounts.append(Mount(
            devnum=(int(major), int(minor)),
            root=_unescape(f[3]),
            mountpoint=_unescape(f[4]),
            fstype=r[0],
            source=_unescape(r[1]),
            options=f[5] if len(f) > 5 else "",
            super_options=r[2] if len(r) > 2 else "",
        ))
    return mounts


def read() -> list[Mount]:
    with open(MOUNTINFO) as f:
        return parse(f.read())


def find(mountpoint: str) -> Mount | None:
    """The mount at exactly `mountpoint` (the last one, if stacked)."""
    found = None
    for m in read():
        if m.mountpoint == mountpoint:
            found = m
    return found
