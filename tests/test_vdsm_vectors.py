"""VDSM's own test vectors, both directions (see tests/data/vdsm-vectors/SOURCES.md).

vdsmlite must read what VDSM wrote and write bytes VDSM's parser accepts. Where VDSM's
tests hold literal bytes we compare with them; where they do not (a block domain's VG
tags, a live volume's slot) we parse what vdsmlite wrote with a small model of VDSM's
reader and writer, written for this test from the rules in
lib/vdsm/storage/{persistent,blockSD,fileSD,volumemetadata}.py at the commit named in
SOURCES.md (its own code is not copied here), and independent of vdsmlite's.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.storage_helpers import (
    DomainUnderTest,
    lv_offset,
    lvm_cmd,
    read_direct,
    shared_domain_fixtures,
)
from vdsmlite import errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage import persistent
from vdsmlite.storage.volmeta import VolumeMetadata

VECTORS = Path(__file__).parent / "data" / "vdsm-vectors"
SD_UUID = "275766cb-c7d8-43d6-a663-4e52160de620"
IMG_UUID = "6b055e16-337d-4cbe-9af9-d75f00f910c1"
PARENT_UUID = "d6f2fcac-e98e-4330-9321-560146f40a84"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


# --- VDSM's reader and writer, modelled --------------------------------------------------
# persistent.py: _dump_lines, _calc_checksum, _parse_lines, PersistentDict._refresh
# (checksum over _dump_lines of the parsed dict, without _SHA_CKSUM) and _flush
# (checksum line appended last); fileSD.py FileMetadataRW (UTF-8, rstrip NUL,
# splitlines); blockSD.py lvmTagEncode/lvmTagDecode, VGTagMetadataRW ("MDT_" prefix).

_VDSM_INVALID_CHARS = re.compile(r"[^a-zA-Z0-9_+.\-/=!:#]")
_VDSM_ESCAPE = re.compile(r"&(\d+)&")


def vdsm_checksum(md: dict[str, str]) -> str:
    h = hashlib.sha1()
    for line in [f"{k}={v}" for k, v in sorted(md.items())]:
        h.update(line.encode("ascii", "xmlcharrefreplace"))
    return h.hexdigest()


def vdsm_parse(lines: list[str]) -> dict[str, str]:
    """PersistentDict._refresh: parse, then verify the seal (raises on 752)."""
    md: dict[str, str] = {}
    for line in lines:
        try:
            key, value = line.split("=", 1)
        except ValueError:
            continue
        md[key.strip()] = value
    stored = md.pop("_SHA_CKSUM", None)
    if stored is not None:
        assert stored == vdsm_checksum(md), "VDSM: MetaDataSealIsBroken (752)"
    return md


def vdsm_dump(md: dict[str, str]) -> list[str]:
    lines = [f"{k}={v}" for k, v in sorted(md.items())]
    lines.append(f"_SHA_CKSUM={vdsm_checksum(md)}")
    return lines


def vdsm_file_read(data: bytes) -> dict[str, str]:
    return vdsm_parse(data.rstrip(b"\0").decode("utf-8").splitlines())


def vdsm_file_write(md: dict[str, str]) -> bytes:
    return b"".join(line.encode("utf-8") + b"\n" for line in vdsm_dump(md))


def vdsm_tags_read(tags: list[str]) -> dict[str, str]:
    return vdsm_parse([_VDSM_ESCAPE.sub(lambda m: chr(int(m.group(1))), t[4:])
                       for t in tags if t.startswith("MDT_")])


def vdsm_tags_write(md: dict[str, str]) -> list[str]:
    return ["MDT_" + _VDSM_INVALID_CHARS.sub(lambda m: f"&{ord(m.group())}&", line)
            for line in vdsm_dump(md)]


def vdsm_volume_parse(data: bytes) -> dict[str, str]:
    """volumemetadata.parse: KEY=VALUE up to EOF; every ATTRIBUTES key required."""
    md: dict[str, str] = {}
    for raw in data.rstrip(b"\0").splitlines():
        line = raw.decode("utf-8")
        if line.startswith("EOF"):
            break
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        md[key.strip()] = value.strip()
    assert "NONE" not in md
    if "SIZE" in md and "CAP" not in md:
        md["CAP"] = str(int(md["SIZE"]) * 512)
    md.setdefault("GEN", "0")
    md.setdefault("SEQ", "0")
    for key in ("DOMAIN", "IMAGE", "PUUID", "CAP", "FORMAT", "TYPE", "VOLTYPE",
                "DISKTYPE", "DESCRIPTION", "LEGALITY", "CTIME", "GEN", "SEQ"):
        assert key in md, f"VDSM: Required key {key!r} is missing"
    for key in ("CAP", "CTIME", "GEN", "SEQ"):
        int(md[key])
    return md


# --- file domain metadata ------------------------------------------------------------------

FILE_MD_VECTORS = ["filesd-metadata-512-1m", "filesd-metadata-4k-1m",
                   "filesd-metadata-4k-2m"]


@pytest.mark.unit
@pytest.mark.parametrize("name", FILE_MD_VECTORS)
def test_file_domain_metadata_vdsm_wrote_reads_and_writes_back_identically(name: str) -> None:
    data = vector(name)
    md = persistent.parse_lines(data)
    assert md["SDUUID"] == SD_UUID and md["VERSION"] == "5" and md["POOL_UUID"] == ""
    assert md["REMOTE_PATH"] == "server:/path" and md["DESCRIPTION"] == "storage domain"
    # VDSM's test_write compares the file with the same text.
    assert persistent.dump_lines(md) == data
    # NUL padding after the text (a block-sized read) changes nothing.
    assert persistent.parse_lines(data + b"\0" * 3000) == md


@pytest.mark.unit
@pytest.mark.parametrize("description", [
    "caf\u00e9 \u05d9\u05e9\u05df",   # VDSM writes UTF-8 and hashes XML char refs
    "trailing space ",             # VDSM keeps the value as written, spaces included
    "  leading",
])
def test_file_domain_metadata_non_ascii_and_spaces_both_ways(description: str) -> None:
    md = {"CLASS": "Data", "DESCRIPTION": description, "SDUUID": SD_UUID, "VERSION": "5"}
    vdsm_bytes = vdsm_file_write(md)
    assert persistent.parse_lines(vdsm_bytes) == md
    ours = persistent.dump_lines(md)
    assert ours == vdsm_bytes
    assert vdsm_file_read(ours) == md


@pytest.mark.unit
def test_block_domain_vg_tags_both_ways() -> None:
    md = {"CLASS": "Data", "DESCRIPTION": "block, caf\u00e9 ", "LOCKPOLICY": "",
          "PV0": "pv:36001405aaaa,uuid:Ab12-cD,pestart:0,pecount:157,mapoffset:0",
          **{f"PV{i}": f"pv:3600140{i},uuid:u{i},pestart:0,pecount:8,mapoffset:{i}"
             for i in range(1, 12)},
          "SDUUID": SD_UUID, "TYPE": "ISCSI", "VERSION": "5", "VGUUID": "Xy-12"}
    vdsm_tags = vdsm_tags_write(md)
    assert persistent.parse_tags([*vdsm_tags, "RHAT_storage_domain"]) == md
    assert sorted(persistent.dump_tags(md)) == sorted(vdsm_tags)
    assert vdsm_tags_read(persistent.dump_tags(md)) == md


# --- volume metadata -----------------------------------------------------------------------


@pytest.mark.unit
def test_volume_metadata_v5_vector_both_ways() -> None:
    data = vector("volume-v5.meta")
    md = VolumeMetadata.from_bytes(data + b"\0" * (512 - len(data)))
    assert md == VolumeMetadata(
        domain=SD_UUID, image=IMG_UUID, parent=PARENT_UUID, capacity=1 << 30,
        format="RAW", type="SPARSE", voltype="LEAF", disktype="DATA", description="",
        legality="LEGAL", ctime=1461095629, generation=0, sequence=0)
    # VDSM's test_storage_format_v5 expects exactly these bytes.
    assert md.to_bytes() == data


@pytest.mark.unit
def test_volume_metadata_v4_vector_reads() -> None:
    md = VolumeMetadata.from_bytes(vector("volume-v4.meta"))
    assert md.capacity == 1 << 30 and md.sequence == 0 and md.image == IMG_UUID
    # Written back as V5 (vdsmlite writes V5 only), which VDSM's parser takes.
    assert vdsm_volume_parse(md.to_bytes())["CAP"] == str(1 << 30)


@pytest.mark.unit
def test_cleared_volume_metadata_is_refused() -> None:
    with pytest.raises(errors.VolumeMetadataReadError):
        VolumeMetadata.from_bytes(vector("cleared-volume-metadata"))


@pytest.mark.unit
def test_volume_lv_tags_of_a_vdsm_domain() -> None:
    """blocksd_test.TestParseLVTags and the lvs output VDSM's getAllVolumes test uses."""
    from vdsmlite.storage.lvm import LV  # noqa: PLC0415

    def lv(tags: tuple[str, ...]) -> LV:
        return LV("vg", "lv", "u", 0, tags, "-wi-----", ())

    parsed = lv(("IU_6b055e16-337d-4cbe-9af9-d75f00f910c1", "MD_93",
                 "PU_d6f2fcac-e98e-4330-9321-560146f40a84"))
    assert parsed.tag_value(sc.TAG_IMAGE) == IMG_UUID
    assert parsed.tag_value(sc.TAG_PARENT) == PARENT_UUID
    assert parsed.tag_value(sc.TAG_SLOT) == "93"
    bad = lv(("IU_x", "PU_y", "MD_INVALID_INT")).tag_value(sc.TAG_SLOT)
    assert bad is not None and not bad.isdigit()  # VDSM: mdslot=None

    rows = [line.split("|") for line in vector(
        "lvs_3386c6f2-926f-42c4-839c-38287fac8998.out").decode().splitlines() if line.strip()]
    slots = {}
    for row in rows:
        tags = tuple(t for t in row[7].strip().split(",") if t)
        if not tags:  # the domain's special LVs (metadata, leases, ids, ...)
            continue
        one = lv(tags)
        img, parent, slot = (one.tag_value(p) for p in (sc.TAG_IMAGE, sc.TAG_PARENT,
                                                       sc.TAG_SLOT))
        assert img and parent and slot and slot.isdigit(), tags
        slots[row[1]] = int(slot)
    assert slots["0574c3f6-3d44-4cc7-98e3-6d90626dd95f"] == 17
    assert len(slots) == len(set(slots.values()))


# --- live domains: what vdsmlite wrote, read as VDSM would ----------------------------------


domains, dom = shared_domain_fixtures("localfs", "block-512")


@pytest.mark.root
def test_live_domain_and_volume_metadata_parse_as_vdsm(dom: DomainUnderTest) -> None:
    img, vol = dom.create_volume(size=1 << 30, desc="vectors caf\u00e9")
    if dom.is_block:
        assert dom.lun is not None
        dev = [dom.lun.loop]
        vg_tags = lvm_cmd("vgs", "--noheadings", "-o", "vg_tags", dom.sd,
                          devices=dev).strip().split(",")
        sd_md = vdsm_tags_read(vg_tags)
        assert "RHAT_storage_domain" in vg_tags
        lv_tags = lvm_cmd("lvs", "--noheadings", "-o", "lv_tags", f"{dom.sd}/{vol}",
                          devices=dev).strip().split(",")
        by_prefix = {t[:3]: t[3:] for t in lv_tags}
        assert by_prefix["IU_"] == img and by_prefix["PU_"] == sc.BLANK_UUID
        slot = int(by_prefix["MD_"])
        # blockSD.metadata_offset (V5): 1 MiB + slot * 8 KiB into the metadata LV.
        base, _ = lv_offset(dom.lun, dom.sd, "metadata")
        raw = read_direct(dom.lun.loop, base + sc.METADATA_BASE_V5 + slot * 8192, 4096)
        vol_md = vdsm_volume_parse(raw[:512])
    else:
        assert dom.data_dir is not None
        sd_md = vdsm_file_read((dom.data_dir / dom.sd / "dom_md" / "metadata").read_bytes())
        meta = dom.data_dir / dom.sd / "images" / img / f"{vol}.meta"
        vol_md = vdsm_volume_parse(meta.read_bytes())
    assert sd_md["SDUUID"] == dom.sd and sd_md["VERSION"] == "5"
    assert vol_md["IMAGE"] == img and vol_md["DOMAIN"] == dom.sd
    assert vol_md["CAP"] == str(1 << 30) and vol_md["DESCRIPTION"] == "vectors caf\u00e9"
