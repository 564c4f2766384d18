"""Domain metadata: KEY=VALUE pairs sealed with a SHA-1 checksum (`_SHA_CKSUM`).

The format is VDSM's, so either agent can read a domain the other wrote:

* the checksum is the SHA-1 hex digest of the ``KEY=VALUE`` strings of every
  key except ``_SHA_CKSUM``, in the order of their *keys* (``PV1`` before
  ``PV10``: sorting the joined strings would put ``PV10=`` first, since ``0``
  sorts before ``=``), concatenated without separators, encoded as ASCII with
  XML character references for anything else;
* a file domain keeps the pairs as sorted lines in ``dom_md/metadata``, encoded as
  UTF-8 (``fileSD.FileMetadataRW``), the checksum line last; a value is kept as
  written, surrounding spaces included (``persistent._parse_lines`` strips keys only);
* a block domain keeps them as VG tags ``MDT_<KEY>=<VALUE>``, where characters
  LVM does not allow in tags are written as ``&<ord>&``.

A seal that does not match is error 752, never a silent load. Metadata with
no checksum at all is trusted (VDSM writes metadata in two steps in old
versions), but every write of ours seals it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping

from vdsmlite import errors

log = logging.getLogger("vdsmlite.storage.persistent")

CHECKSUM_KEY = "_SHA_CKSUM"
TAG_PREFIX = "MDT_"

# Characters LVM accepts in tags, besides the '&' we use to escape the rest.
_TAG_SAFE = re.compile(r"[A-Za-z0-9_+.\-/=!:#]")
_TAG_ESCAPE = re.compile(r"&(\d+)&")
_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")


def checksum(md: Mapping[str, str]) -> str:
    lines = [f"{k}={v}" for k, v in sorted(md.items()) if k != CHECKSUM_KEY]
    digest = hashlib.sha1()
    for line in lines:
        digest.update(line.encode("ascii", "xmlcharrefreplace"))
    return digest.hexdigest()


def seal(md: Mapping[str, str]) -> dict[str, str]:
    """A copy of `md` with a fresh checksum."""
    out = {k: v for k, v in md.items() if k != CHECKSUM_KEY}
    for k, v in out.items():
        if not _KEY_RE.match(k) or "\n" in v or "\0" in v:
            raise errors.MetaDataGeneralError(f"cannot store metadata {k!r}={v!r}")
    out[CHECKSUM_KEY] = checksum(out)
    return out


def verify(md: Mapping[str, str]) -> dict[str, str]:
    """The pairs without the checksum, after checking the seal (752 if broken)."""
    stored = md.get(CHECKSUM_KEY)
    pairs = {k: v for k, v in md.items() if k != CHECKSUM_KEY}
    if stored is None:
        return pairs
    computed = checksum(pairs)
    if stored != computed:
        if stored == _string_order_checksum(pairs):
            # Sealed by vdsmlite before it ordered lines by key (only differs past ten
            # PVs): the same data, accepted; the next write seals it VDSM's way.
            log.warning("metadata sealed in vdsmlite's old line order; accepted")
            return pairs
        raise errors.MetaDataSealIsBroken(stored, computed)
    return pairs


def _string_order_checksum(md: Mapping[str, str]) -> str:
    digest = hashlib.sha1()
    for line in sorted(f"{k}={v}" for k, v in md.items()):
        digest.update(line.encode("ascii", "xmlcharrefreplace"))
    return digest.hexdigest()


# --- file domain: lines ------------------------------------------------------------


def dump_lines(md: Mapping[str, str]) -> bytes:
    sealed = seal(md)
    cksum = sealed.pop(CHECKSUM_KEY)
    lines = [f"{k}={v}" for k, v in sorted(sealed.items())] + [f"{CHECKSUM_KEY}={cksum}"]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def parse_lines(data: bytes) -> dict[str, str]:
    """KEY=VALUE lines (stopping at NUL padding) -> verified dict, read as VDSM does:
    UTF-8 text, the key stripped, the value as written."""
    try:
        text = data.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.MetaDataGeneralError(f"metadata is not UTF-8: {e}") from e
    md: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise errors.MetaDataGeneralError(f"malformed metadata line {line!r}")
        md[key.strip()] = value
    return verify(md)


# --- block domain: VG tags ------------------------------------------------------------


def tag_encode(value: str) -> str:
    return "".join(c if _TAG_SAFE.match(c) else f"&{ord(c)}&" for c in value)


def tag_decode(value: str) -> str:
    return _TAG_ESCAPE.sub(lambda m: chr(int(m.group(1))), value)


def dump_tags(md: Mapping[str, str]) -> list[str]:
    return [f"{TAG_PREFIX}{k}={tag_encode(v)}" for k, v in sorted(seal(md).items())]


def parse_tags(tags: Iterable[str]) -> dict[str, str]:
    md = {}
    for tag in tags:
        if not tag.startswith(TAG_PREFIX):
            continue
        key, sep, value = tag[len(TAG_PREFIX):].partition("=")
        if sep:
            md[key] = tag_decode(value)
    return verify(md)


def metadata_tags(tags: Iterable[str]) -> list[str]:
    return [t for t in tags if t.startswith(TAG_PREFIX)]
