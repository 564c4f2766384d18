"""The streaming OVF_STORE tar validator and writer, against Python's tarfile."""

from __future__ import annotations

import io
import itertools
import mmap
import os
import random
import tarfile
import uuid

import pytest
import xxhash

from tests.helpers import c_and_python
from tests.ovf_helpers import build_tar, entity_ovf, store_tar
from tests.tar_helpers import ADVERSARIAL, GOOD_OVF, OVF_ID, XXE
from vdsmlite.ovf import _tarscan, tarstream
from vdsmlite.ovf.tarstream import (
    RECORD,
    SPLIT_BYTES,
    TarError,
    TarValidator,
    TarWriter,
    entity_id_from_name,
    iter_members,
)

pytestmark = pytest.mark.unit


# Every test runs with the C hot loop (`_tarscan`) and with the Python one.
hot_loop = c_and_python(tarstream, "_tarscan")

SD = "c2a6d7c8-8d81-4e01-9ed4-7eb670713448"


def validate(data: bytes, chunk: int = 65536, max_total: int = 1 << 30):
    v = TarValidator(max_total)
    for i in range(0, len(data), chunk):
        v.feed(data[i:i + chunk])
    return v.finish()


def good_store(n: int = 3) -> tuple[bytes, list[str]]:
    entities = [entity_ovf(f"vm-{i}") for i in range(n)]
    return store_tar(SD, entities, {entities[0][0]: 1}), [e[0] for e in entities]


@pytest.mark.parametrize("chunk", [1, 511, 512, 4096, 10**6])
def test_valid_store_in_any_chunking(chunk: int) -> None:
    data, ids = good_store()
    summary = validate(data, chunk)
    assert summary.entity_ids == ids
    assert summary.info["Storage Domains"] == [{"uuid": SD}]
    assert summary.metadata == {"VM Status": {ids[0]: 1}}
    assert summary.end <= len(data)


@pytest.mark.parametrize("chunk", [1, 4096, 10**6])
def test_the_digest_is_of_every_byte_fed_however_cut(chunk: int) -> None:
    # What a kept index is checked against: the same for the upload's buffers as for
    # a scan of the volume after a restart (padding after the end marker included).
    data, _ = good_store()
    data += bytes(3 * 512)
    v = TarValidator(1 << 30, digest=True)
    for i in range(0, len(data), chunk):
        v.feed(data[i:i + chunk])
    assert v.finish().digest == xxhash.xxh3_128_hexdigest(data)
    assert validate(data).digest is None  # only asked for


# 1 MiB: whole members in one buffer, the upload's hot loop (_whole_members).
@pytest.mark.parametrize("chunk", [1, 3, 700, 1 << 20])
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_archives_are_refused(case: str, chunk: int) -> None:
    data, complaint = ADVERSARIAL[case]
    with pytest.raises(TarError) as e:
        validate(data, chunk=chunk)
    assert complaint.lower() in str(e.value).lower(), str(e.value)


def test_dtd_markup_is_found_wherever_the_buffers_cut_it() -> None:
    # The marker "<!D" at every position relative to a buffer edge, in both encodings.
    for doc in (XXE, b"\xff\xfe" + "<x><!DOCTYPE y></x>".encode("utf-16-le")):
        data = build_tar([(f"{OVF_ID}.ovf", doc)])
        for first in range(512, 512 + len(doc) + 1):
            v = TarValidator(1 << 30)
            with pytest.raises(TarError, match="DTD"):
                v.feed(data[:first])
                v.feed(data[first:])
                v.finish()


# Not well-formed, or not what an OVF reader wants, but harmless to any parser: kept
# (the index built after the commit reports them), unless the caller asks for check_xml.
HARMLESS = {
    "malformed": b"<ovf:Envelope",
    "comment-and-cdata": b"<x><!-- a comment --><![CDATA[ a < b ]]>!!</x>",
    "bang-at-the-end": b"<x>wow!</x>!",
    "utf16-with-bom": b"\xff\xfe" + "<?xml version='1.0' encoding='UTF-16'?><x>!</x>"
    .encode("utf-16-le"),
    "utf16be-no-bom": "<?xml version='1.0'?><x><!-- c --></x>".encode("utf-16-be"),
    "declared-ascii": b"<?xml version='1.0' encoding='us-ascii'?><x/>",
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HARMLESS))
@pytest.mark.parametrize("chunk", [1, 5, 4096, 1 << 20])
def test_harmless_documents_are_kept(case: str, chunk: int) -> None:
    data = build_tar([(f"{OVF_ID}.ovf", HARMLESS[case])])
    assert validate(data, chunk).entity_ids == [OVF_ID]


def test_splits_fall_on_member_headers() -> None:
    docs = [entity_ovf(f"vm-{i}") for i in range(400)]
    data = store_tar(SD, docs)
    summary = validate(data, chunk=1 << 20)
    assert summary.splits[0] == 0
    assert len(data) > 1.5 * SPLIT_BYTES and len(summary.splits) >= 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = {m.offset for m in tar.getmembers()}
    assert set(summary.splits) <= offsets
    # Each split is the first header at or after SPLIT_BYTES past the previous one.
    for a, b in itertools.pairwise(summary.splits):
        assert b >= a + SPLIT_BYTES
        assert not any(a + SPLIT_BYTES <= o < b for o in offsets)
    assert summary.members_end == summary.end - 1024


def test_mmap_buffers_are_searched_in_place() -> None:
    data, ids = good_store()
    buf = mmap.mmap(-1, len(data) + 4096)
    buf[:len(data)] = data
    v = TarValidator(1 << 30)
    v.feed(buf, len(data))
    assert v.finish().entity_ids == ids


def test_archive_larger_than_the_volume() -> None:
    data, _ = good_store()
    with pytest.raises(TarError) as e:
        validate(data, max_total=len(data) - 1)
    assert e.value.too_large


def test_writer_output_is_read_by_tarfile_and_by_the_validator() -> None:
    w = TarWriter(mtime=1700000000)
    chunks = [*w.member("info.json", b'{"a": 1}'), *w.member(f"{OVF_ID}.ovf", GOOD_OVF),
              *w.end()]
    data = b"".join(chunks)
    assert len(data) == w.length
    assert len(data) % RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["info.json", f"{OVF_ID}.ovf"]
        f = tar.extractfile(f"{OVF_ID}.ovf")
        assert f is not None and f.read() == GOOD_OVF
    assert validate(data).entity_ids == [OVF_ID]


def test_iter_members_hands_members_on_byte_for_byte() -> None:
    data, _ = good_store(2)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = []
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            expected.append((m.name, f.read()))
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    assert list(iter_members(chunks, len(data))) == expected


# --- tar member names --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("70f24c82-a7b8-4e0b-9192-cffd5705cf5c.ovf", "70f24c82-a7b8-4e0b-9192-cffd5705cf5c"),
    ("70F24C82-A7B8-4E0B-9192-CFFD5705CF5C.ovf", "70f24c82-a7b8-4e0b-9192-cffd5705cf5c"),
    ("../x.ovf", None),
    ("../70f24c82-a7b8-4e0b-9192-cffd5705cf5c.ovf", None),
    ("./70f24c82-a7b8-4e0b-9192-cffd5705cf5c.ovf", None),
    ("/70f24c82-a7b8-4e0b-9192-cffd5705cf5c.ovf", None),
    ("x.ovf", None),
    ("info.json", None),
    ("metadata.json", None),
    ("70f24c82-a7b8-4e0b-9192-cffd5705cf5c.ovf.tmp", None),
    ("70f24c82-a7b8-4e0b-9192-cffd5705cf5c.ovf\n", None),
    ("70f24c82-a7b8-4e0b-9192-cffd5705cf5c", None),
    ("70f24c82a7b84e0b9192cffd5705cf5c.ovf", None),
    ("{70f24c82-a7b8-4e0b-9192-cffd5705cf5c}.ovf", None),
    ("", None),
])
def test_entity_id_from_name(name: str, expected: str | None) -> None:
    assert entity_id_from_name(name) == expected


def test_every_corrupted_header_byte_is_refused_in_the_hot_loop() -> None:
    # One member in a buffer of its own is checked by _whole_members; any single byte
    # of its header changed (so its checksum no longer holds) must be refused there or
    # by the general path it falls back to, never accepted.
    data = build_tar([(f"{OVF_ID}.ovf", GOOD_OVF)])
    validate(data, chunk=len(data))
    for at in [*range(0, 148), *range(156, 512)]:
        for delta in (1, 0x80):
            bad = bytearray(data)
            bad[at] = (bad[at] + delta) % 256
            with pytest.raises(TarError):
                validate(bytes(bad), chunk=len(bad))


def commons_compress_member(name: str, data: bytes, mtime: int = 1_700_000_000) -> bytes:
    """A member as the engine's tar writer, Apache commons-compress (ovirt-engine's
    InMemoryTar: a TarArchiveOutputStream of default TarArchiveEntry's), lays it out -
    from its TarUtils, not from our writer: mode by formatOctalBytes (digits, space,
    NUL), uid/gid/size/mtime by formatLongOctalBytes (digits, then a space - no NUL),
    the checksum by formatCheckSumOctalBytes (6 digits, NUL, space), POSIX magic
    "ustar\\0" + "00", the user and group names filled in."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"100644 \0"
    h[108:116] = b"0000000 "
    h[116:124] = b"0000000 "
    h[124:136] = b"%011o " % len(data)
    h[136:148] = b"%011o " % mtime
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[265:270] = b"ovirt"
    h[297:302] = b"ovirt"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + b"\0" * (-len(data) % 512)


def test_the_engines_headers_take_the_hot_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every .ovf member of an engine-written store must be checked by _whole_members;
    # only the end marker's two blocks go the general way.
    docs = [entity_ovf(f"vm-{i}") for i in range(20)]
    data = b"".join(commons_compress_member(f"{eid}.ovf", doc) for eid, doc in docs)
    data += b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # a real reader agrees
        assert tar.getnames() == [f"{eid}.ovf" for eid, _ in docs]
    general: list[int] = []
    original = TarValidator._on_block

    def counting(self: TarValidator, block: bytes, offset: int) -> None:
        general.append(offset)
        original(self, block, offset)

    monkeypatch.setattr(TarValidator, "_on_block", counting)
    summary = validate(data, chunk=len(data))
    assert summary.entity_ids == [eid for eid, _ in docs]
    assert general == [len(data) - 1024, len(data) - 512]
    # The same headers, cut anywhere, through the general path.
    assert validate(data, chunk=700).entity_ids == [eid for eid, _ in docs]


def outcome(data: bytes) -> object:
    """What validating `data` in one buffer gives: the summary's lists, or the error."""
    try:
        summary = validate(data, chunk=len(data) or 1)
    except TarError as e:
        return ("refused", str(e), e.too_large)
    return (summary.entity_ids, summary.splits, summary.members_end, summary.end)


def test_c_and_python_hot_loops_agree_on_mutated_archives(
        hot_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The C loop may only accept what the Python one accepts, with the same effects:
    # random archives, one byte changed (in headers, data, padding) or a "!" or a
    # duplicate put in, each judged by both.
    if hot_loop == "python":
        pytest.skip("compares the two loops once")
    rng = random.Random(1414)
    docs = [entity_ovf(f"vm-{i}") for i in range(6)]
    variants = [b'<?xml version="1.0" encoding="UTF-8"?>', b"<?xml version='1.0'?>", b""]
    for case in range(300):
        members = []
        for eid, doc in docs:
            body = doc.split(b"?>", 1)[-1] if doc.startswith(b"<?xml") else doc
            members.append((f"{eid}.ovf", rng.choice(variants) + body))
        if case % 7 == 0:
            members.append(members[rng.randrange(len(members))])  # a duplicate
        data = bytearray(build_tar(members))
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            headers = [info.offset for info in tar.getmembers()]
        for _ in range(rng.choice([0, 1, 1, 2])):
            # half in a header, half anywhere (data, padding, the end marker)
            at = (rng.choice(headers) + rng.randrange(512) if rng.random() < 0.5
                  else rng.randrange(len(data)))
            data[at] = rng.choice([0, 0x20, 0x21, 0x30, 0x37, 0x38, rng.randrange(256)])
        with_c = outcome(bytes(data))
        monkeypatch.setattr(tarstream, "_tarscan", None)
        in_python = outcome(bytes(data))
        monkeypatch.undo()
        assert with_c == in_python, case


def test_octal_fields_with_8_or_9_are_refused_as_tar_errors() -> None:
    # isdigit() let them through to int(..., 8): a ValueError (an internal error to the
    # client), not a refused archive.
    data = build_tar([(f"{OVF_ID}.ovf", GOOD_OVF)])
    for field in (148, 124):
        bad = bytearray(data)
        bad[field:field + 8] = b"0000009\0"
        with pytest.raises(TarError, match=r"not an octal number|bad checksum"):
            validate(bytes(bad), chunk=len(bad))


def test_the_c_loop_takes_the_ordinary_members(hot_loop: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Python sees the first member (no XML declaration known yet) and the end marker;
    # C all the members in between.
    docs = [entity_ovf(f"vm-{i}") for i in range(20)]
    data = build_tar([(f"{eid}.ovf", doc) for eid, doc in docs])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [info.offset for info in tar.getmembers()]
    in_python: list[tuple[int, int]] = []  # (from, to) of what Python accepted
    original = TarValidator._python_members

    def spying(self: TarValidator, buf: bytes, pos: int, n: int, limit: int = -1) -> int:
        after = original(self, buf, pos, n, limit)
        in_python.extend([(pos, after)] if after != pos else [])
        return after

    monkeypatch.setattr(TarValidator, "_python_members", spying)
    assert validate(data, chunk=len(data)).entity_ids == [eid for eid, _ in docs]
    members_end = offsets[-1] + 512 + -(-len(docs[-1][1]) // 512) * 512
    expected = [(0, offsets[1])] if hot_loop == "c" else [(0, members_end)]
    assert in_python == expected


@pytest.mark.parametrize("where", ["same buffer", "next buffer"])
@pytest.mark.parametrize("upper", [False, True], ids=["same case", "upper case"])
def test_a_duplicate_entity_is_refused_where_it_stands(where: str, upper: bool) -> None:
    # Twenty ordinary members (C takes them in one scan) and one repeating the
    # fifth: in the same buffer, or in a later one (found in what earlier scans kept).
    docs = [entity_ovf(f"vm-{i}") for i in range(20)]
    repeat = docs[4][0].upper() if upper else docs[4][0]
    data = build_tar([(f"{eid}.ovf", doc) for eid, doc in docs]
                     + [(f"{repeat}.ovf", docs[4][1])])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        duplicate_at = tar.getmembers()[-1].offset
    chunk = len(data) if where == "same buffer" else duplicate_at
    v = TarValidator(1 << 30)
    with pytest.raises(TarError, match=rf"duplicate member {repeat}\.ovf"):
        for i in range(0, len(data), chunk):
            v.feed(data[i:i + chunk])
        v.finish()
    # Everything before it was taken, in order, once.
    assert v.summary.entity_ids == [eid for eid, _ in docs]


def test_ids_are_told_apart_through_the_tables_growth() -> None:
    # 6,000 small members (the C table starts at 4,096 slots, half full at most, so
    # it grows inside a scan), then the first one's id again, in upper case: found
    # after the growth, in whichever loop runs.
    ids = [str(uuid.UUID(int=random.Random(5).getrandbits(128) ^ i)) for i in range(6000)]
    doc = b'<?xml version="1.0" encoding="UTF-8"?><ovf:Envelope/>'
    data = build_tar([(f"{eid}.ovf", doc) for eid in ids] + [(f"{ids[0].upper()}.ovf", doc)])
    v = TarValidator(1 << 30)
    with pytest.raises(TarError, match=rf"duplicate member {ids[0].upper()}\.ovf"):
        v.feed(data)
        v.finish()
    assert v.summary.entity_ids == ids and v.summary.entity_count == len(ids)


def test_the_c_id_table_keeps_ids_in_any_case() -> None:
    table = _tarscan.IdTable(os.urandom(16))
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    assert all(_tarscan.id_add(table, eid) for eid in ids)
    assert not any(_tarscan.id_add(table, eid.upper()) for eid in ids)
    assert _tarscan.id_add(table, str(uuid.uuid4()))
    # The nil id's bits are the table's mark of a free slot: it is kept apart.
    nil = str(uuid.UUID(int=0))
    assert _tarscan.id_add(table, nil) and not _tarscan.id_add(table, nil)
    assert _tarscan.id_add(table, str(uuid.UUID(int=1)))  # no neighbour taken for it
    one_dash_off = ids[0][:8] + ids[0][9] + "-" + ids[0][10:]
    for bad in ("", "not-an-id", ids[0][:-1], ids[0] + "0", ids[0].replace("-", "_"),
                one_dash_off, ids[0][:5] + "g" + ids[0][6:], ids[0][:35] + "\x00"):
        with pytest.raises(ValueError, match="not an entity id"):
            _tarscan.id_add(table, bad)
    with pytest.raises(ValueError, match="16 bytes"):
        _tarscan.IdTable(b"short")

