"""On-storage formats, byte for byte as VDSM writes them (test vectors from VDSM's own tests)."""

from __future__ import annotations

import hashlib

import pytest

from vdsmlite import errors
from vdsmlite.storage import constants as sc
from vdsmlite.storage import persistent
from vdsmlite.storage.volmeta import VolumeMetadata, truncate_description

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("md", "expected"), [
    ({}, "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    ({"int_str": "1", "str_str": "2"}, "fd58b7962408a4956bd694d617a1201306b363c2"),
    ({"key 1": "value 1"}, "fce57dc690209dc4109d993de9c11d72c8ffd4b6"),
    ({"key 1": "value 1", "key 2": "value 2"}, "ad4e8ffdd89dde809bf1ed700838b590b08a3826"),
])
def test_checksum_vectors(md: dict[str, str], expected: str) -> None:
    assert persistent.checksum(md) == expected


def test_checksum_orders_lines_by_key_as_vdsm_does() -> None:
    """VDSM hashes `"%s=%s" % kv for kv in sorted(md.items())`: PV1 before PV10. Sorting
    the joined strings instead would put "PV10=" first ("0" < "="), and past ten PVs
    each agent would refuse the other's block domain metadata with 752."""
    md = {"PV1": "pv:a", "PV10": "pv:b", "PV2": "pv:c"}
    by_key = hashlib.sha1(b"PV1=pv:aPV10=pv:bPV2=pv:c").hexdigest()
    by_string = hashlib.sha1(b"PV10=pv:bPV1=pv:aPV2=pv:c").hexdigest()
    assert persistent.checksum(md) == by_key != by_string
    # What vdsmlite sealed in the old order still reads (and is resealed on write).
    assert persistent.verify({**md, "_SHA_CKSUM": by_string}) == md
    with pytest.raises(errors.MetaDataSealIsBroken):
        persistent.verify({**md, "_SHA_CKSUM": "0" * 40})


def test_checksum_of_non_ascii_uses_xml_char_refs() -> None:
    md = {"DESCRIPTION": "caf\u00e9"}
    assert persistent.checksum(md) == hashlib.sha1(b"DESCRIPTION=caf&#233;").hexdigest()


def test_file_metadata_lines_round_trip_and_seal() -> None:
    md = {"SDUUID": "x", "CLASS": "Data", "POOL_UUID": ""}
    data = persistent.dump_lines(md)
    lines = data.decode().splitlines()
    assert lines[:-1] == ["CLASS=Data", "POOL_UUID=", "SDUUID=x"]
    assert lines[-1] == "_SHA_CKSUM=" + hashlib.sha1(b"CLASS=DataPOOL_UUID=SDUUID=x").hexdigest()
    assert data.endswith(b"\n")
    assert persistent.parse_lines(data + b"\0" * 100) == md
    tampered = data.replace(b"CLASS=Data", b"CLASS=Iso!")
    with pytest.raises(errors.MetaDataSealIsBroken) as e:
        persistent.parse_lines(tampered)
    assert e.value.code == 752


def test_metadata_without_checksum_is_trusted() -> None:
    assert persistent.parse_lines(b"A=1\nB=2\n") == {"A": "1", "B": "2"}


@pytest.mark.parametrize(("plain", "encoded"), [
    ("&", "&38&"), ("\u05d9", "&1497&"), ("$@|", "&36&&64&&124&"),
    ("pv:36001405,uuid:a", "pv:36001405&44&uuid:a"), ("a b", "a&32&b"),
    ("az09_+.-/=!:#", "az09_+.-/=!:#"),
])
def test_lvm_tag_encoding(plain: str, encoded: str) -> None:
    assert persistent.tag_encode(plain) == encoded
    assert persistent.tag_decode(encoded) == plain


def test_vg_tags_round_trip_with_seal_over_decoded_lines() -> None:
    md = {"DESCRIPTION": "my domain, v5", "PV0": "pv:3600,uuid:x,pestart:0"}
    tags = persistent.dump_tags(md)
    assert "MDT_DESCRIPTION=my&32&domain&44&&32&v5" in tags
    cksum = next(t for t in tags if t.startswith("MDT__SHA_CKSUM=")).split("=", 1)[1]
    assert cksum == persistent.checksum(md)  # over decoded KEY=VALUE, no MDT_ prefix
    assert persistent.parse_tags([*tags, "RHAT_storage_domain"]) == md


def meta(**over: object) -> VolumeMetadata:
    base = VolumeMetadata(domain="d" * 36, image="i" * 36, parent=sc.BLANK_UUID,
                          capacity=1 << 30, format="RAW", type="SPARSE", voltype="LEAF",
                          disktype="DATA", description="", legality="LEGAL",
                          ctime=1461095629, generation=0, sequence=0)
    return base.replace(**over)


def test_volume_metadata_format() -> None:
    text = meta().to_bytes().decode()
    assert text == ("CAP=1073741824\nCTIME=1461095629\nDESCRIPTION=\nDISKTYPE=DATA\n"
                    f"DOMAIN={'d' * 36}\nFORMAT=RAW\nGEN=0\nIMAGE={'i' * 36}\nLEGALITY=LEGAL\n"
                    f"PUUID={sc.BLANK_UUID}\nSEQ=0\nTYPE=SPARSE\nVOLTYPE=LEAF\nEOF\n")
    assert VolumeMetadata.from_bytes(meta().to_bytes() + b"\0" * 200) == meta()


def test_volume_metadata_reads_v4_size() -> None:
    v4 = meta().to_bytes().replace(b"CAP=1073741824", b"SIZE=2097152")
    assert VolumeMetadata.from_bytes(v4).capacity == 1 << 30


def test_volume_metadata_limits() -> None:
    with pytest.raises(errors.MetadataOverflowError):
        meta(description="x" * 400).to_bytes()
    with pytest.raises(errors.MetaDataGeneralError):
        meta(description="two\nlines").to_bytes()
    for broken in (b"", b"\0" * 512, b"NONE=######\nEOF\n", b"CAP=x\nEOF\n"):
        with pytest.raises(errors.VolumeMetadataReadError):
            VolumeMetadata.from_bytes(broken)


def test_description_keeps_210_characters_as_vdsm() -> None:
    assert truncate_description("x" * 300) == "x" * 210
    # Characters, not bytes (VDSM's validate_description): 200 x "é" stay whole.
    assert truncate_description("\u00e9" * 200) == "\u00e9" * 200
    assert truncate_description("\u00e9" * 300) == "\u00e9" * 210
    assert truncate_description("short") == "short"


@pytest.mark.parametrize(("block", "hosts", "align"), [
    (512, 2000, 1 << 20), (4096, 250, 1 << 20), (4096, 251, 2 << 20), (4096, 500, 2 << 20),
    (4096, 1000, 4 << 20), (4096, 2000, 8 << 20),
])
def test_sanlock_alignment(block: int, hosts: int, align: int) -> None:
    assert sc.alignment_for(block, hosts) == align
