"""Hostile OVF_STORE archives built with Python's tarfile (`ADVERSARIAL`: each with a word
its refusal must contain), the raw member builders they need, and the OVF documents in
them: a good one (`GOOD_OVF`, id `OVF_ID`), an XXE and a billion laughs."""

from __future__ import annotations

import io
import tarfile
import uuid

from tests.ovf_helpers import build_tar, entity_ovf

XXE = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
       b'<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/">&e;</ovf:Envelope>')
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "%s">' % (i, b"&lol%d;" % (i - 1) * 10 if i > 1
                                                  else b"&lol;" * 10) for i in range(1, 10))
          + b']><ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/">&lol9;'
          b"</ovf:Envelope>")


def member(name: str, data: bytes = b"{}", **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def raw_tar(infos: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


OVF_ID = str(uuid.uuid4())
GOOD_OVF = entity_ovf("x", OVF_ID)[1]


def _bad_checksum() -> bytes:
    data = bytearray(build_tar([("info.json", b"{}")]))
    data[0] ^= 0x01  # name byte changes, stored checksum does not
    return bytes(data)


def _trailing_garbage() -> bytes:
    data = bytearray(build_tar([("info.json", b"{}")]))
    data[-1] = 0x41
    return bytes(data)


def _longer_than_declared() -> bytes:
    data = bytearray(build_tar([("info.json", b"{}")]))
    # Declare 2 bytes but follow them with text where the next header should be.
    data[512:512 + 40] = b'{} and then much more than was declared.'
    return bytes(data)


ADVERSARIAL = {
    "dotdot": (raw_tar([(member("../x.ovf", GOOD_OVF), GOOD_OVF)]), "member name"),
    "absolute": (raw_tar([(member("/etc/x.ovf", GOOD_OVF), GOOD_OVF)]), "member name"),
    "nested": (raw_tar([(member(f"d/{OVF_ID}.ovf", GOOD_OVF), GOOD_OVF)]), "member name"),
    # Once let through (a "$" that also matched before a final newline) and then left
    # out of every listing, since the name does not end in ".ovf".
    "newline": (build_tar([(f"{OVF_ID}.ovf\n", GOOD_OVF)]), "member name"),
    "symlink": (raw_tar([(member(f"{OVF_ID}.ovf", b"", type=tarfile.SYMTYPE,
                                 linkname="/etc/passwd"), b"")]), "symbolic link"),
    "hardlink": (raw_tar([(member(f"{OVF_ID}.ovf", b"", type=tarfile.LNKTYPE,
                                  linkname="info.json"), b"")]), "hard link"),
    "device": (raw_tar([(member(f"{OVF_ID}.ovf", b"", type=tarfile.CHRTYPE), b"")]),
               "character device"),
    "directory": (raw_tar([(member("images", b"", type=tarfile.DIRTYPE), b"")]), "directory"),
    "fifo": (raw_tar([(member("info.json", b"", type=tarfile.FIFOTYPE), b"")]), "FIFO"),
    "pax": (raw_tar([(member("info.json", b"{}", pax_headers={"comment": "x"}), b"{}")],
                    fmt=tarfile.PAX_FORMAT), "pax header"),
    "gnu-longname": (raw_tar([(member("a" * 120 + ".ovf", GOOD_OVF), GOOD_OVF)],
                             fmt=tarfile.GNU_FORMAT), "GNU long name"),
    "duplicate": (build_tar([("info.json", b"{}"), ("info.json", b"{}")]), "duplicate"),
    "bad-checksum": (_bad_checksum(), "bad checksum"),
    "truncated": (build_tar([(f"{OVF_ID}.ovf", GOOD_OVF)])[:1000], "truncated"),
    "no-end-marker": (build_tar([("info.json", b"{}")])[:1024], "no end-of-archive"),
    "longer-than-declared": (_longer_than_declared(), "longer than its declared size"),
    "after-end": (_trailing_garbage(), "after the end-of-archive"),
    "xxe": (build_tar([(f"{OVF_ID}.ovf", XXE)]), ".ovf"),
    "billion-laughs": (build_tar([(f"{OVF_ID}.ovf", LAUGHS)]), ".ovf"),
    "xxe-utf16": (build_tar([(f"{OVF_ID}.ovf",
                              b"\xff\xfe" + XXE.replace(b'<?xml version="1.0"?>', b"")
                              .decode().encode("utf-16-le"))]), "DTD"),
    "xxe-utf16be": (build_tar([(f"{OVF_ID}.ovf",
                                XXE.replace(b'<?xml version="1.0"?>', b"")
                                .decode().encode("utf-16-be"))]), "DTD"),
    "element-decl": (build_tar([(f"{OVF_ID}.ovf", b"<!ELEMENT x ANY><x/>")]), "DTD"),
    "declared-utf7": (build_tar([(f"{OVF_ID}.ovf", b'<?xml version="1.0" encoding="UTF-7"?>'
                                  b"+ADw-!DOCTYPE x+AD4-<x/>")]), "encoding"),
    "declared-latin1": (build_tar([(f"{OVF_ID}.ovf",
                                    b"<?xml version='1.0' encoding='ISO-8859-1'?><x/>")]),
                        "encoding"),
    "utf32": (build_tar([(f"{OVF_ID}.ovf", "<x/>".encode("utf-32-le"))]), "UTF-32"),
    "ebcdic": (build_tar([(f"{OVF_ID}.ovf", "<?xml version='1.0'?><x/>".encode("cp500"))]),
               "EBCDIC"),
    "bad-json": (build_tar([("metadata.json", b"{nope")]), "invalid JSON"),
    "not-a-tar": (b"PK\x03\x04" + b"\0" * 2000, "header"),
    "empty": (b"", "no end-of-archive"),
}
