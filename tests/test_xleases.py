"""External leases: VDSM's xleases format, and Lease.* on real file and block domains.

The format tests build VDSM's bytes by hand from its layout (lib/vdsm/storage/
xlease.py and the offsets its tests poke: version at +5, lockspace at +10, mtime at
+59 of the index slot) and read them; and write an index and compare it byte for
byte. The domain tests drive real sanlock daemons, loop LUNs and LVM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_storage.cluster import SimHost
from tests.helpers import code_of
from tests.storage_helpers import (
    DomainUnderTest,
    SharedDomains,
    StorageEnv,
    join_lockspace,
    make_localfs_domain,
    make_posixfs_domain,
    new_id,
    read_direct,
    run_task,
    wait_task,
)
from vdsmlite import errors
from vdsmlite.storage import xleases

MiB = 1 << 20
INVALID_PARAMS = -32602


# --- the format, on a plain file ------------------------------------------------------------


def vdsm_metadata(lockspace: str, mtime: int, updating: bool = False) -> bytes:
    """The index metadata block as VDSM lays it out (literal bytes)."""
    return (b"\x12\x15\x20\x16" + b"\0" + b"0001" + b"\0" + lockspace.encode().ljust(48, b"\0")
            + b"\0" + b"%010d" % mtime + b"\0" + (b"u" if updating else b"-") + b"\0" * 440
            + b"\n")


def vdsm_record(lease_id: str = "", offset: int = 0, updating: bool = False) -> bytes:
    return (lease_id.encode().ljust(48, b"\0") + b"\0" + b"%011d" % offset + b"\0"
            + (b"u" if updating else b"-") + b"-" + b"\n")


FREE = vdsm_record()


def volume(tmp_path: Path, index: bytes, alignment: int = MiB) -> str:
    """A file holding `index` in slot 1, as an xleases volume would."""
    path = tmp_path / "xleases"
    with open(path, "wb") as f:
        f.truncate(8 * alignment)
        f.seek(alignment)
        f.write(index)
    return str(path)


def vdsm_index(lockspace: str, records: dict[int, bytes]) -> bytes:
    body = b"".join(records.get(n, FREE) for n in range(xleases.MAX_RECORDS))
    return vdsm_metadata(lockspace, 1500000000) + body


def test_constants_are_vdsms() -> None:
    assert xleases.INDEX_SIZE == 253952
    assert xleases.MAX_RECORDS == 3960
    assert xleases.lease_offset(0, MiB) == 3 * MiB
    assert xleases.lease_offset(5, 8 * MiB) == 64 * MiB
    assert len(vdsm_metadata("x", 0)) == 512 and len(FREE) == 64


@pytest.mark.parametrize(("block_size", "alignment"),
                         [(512, MiB), (4096, MiB), (4096, 2 * MiB), (4096, 8 * MiB)])
def test_formatted_index_is_vdsms_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        block_size: int, alignment: int) -> None:
    monkeypatch.setattr("time.time", lambda: 123456789)
    sd = new_id()
    path = tmp_path / "xleases"
    path.touch()  # a file domain's xleases starts empty
    xleases.format_index(sd, str(path), alignment=alignment, block_size=block_size)
    data = path.read_bytes()
    assert len(data) == alignment + xleases.INDEX_SIZE
    assert data[:alignment] == b"\0" * alignment  # the lockspace slot is not written
    index = data[alignment:]
    assert index[:4] == b"\x12\x15\x20\x16"  # big endian, as VDSM's test checks
    assert index[:512] == vdsm_metadata(sd, 123456789)
    assert index[512:] == FREE * xleases.MAX_RECORDS
    vol = xleases.LeasesVolume(str(path), alignment=alignment, block_size=block_size)
    assert (vol.lockspace, vol.metadata.version, vol.metadata.mtime) == (sd, 1, 123456789)
    assert vol.leases() == {}


def test_reads_an_index_vdsm_wrote(tmp_path: Path) -> None:
    sd, a, b, half = new_id(), new_id(), new_id(), new_id()
    # Offsets in records are informational: VDSM computes them from the record number.
    path = volume(tmp_path, vdsm_index(sd, {
        0: vdsm_record(a, 3 * MiB),
        1: b"!" * 64,  # a corrupted record (VDSM's test_leases_bad_record)
        2: vdsm_record(b, 999),
        42: vdsm_record(half, 0, updating=True),  # half-added by an old VDSM
    }))
    vol = xleases.LeasesVolume(path, alignment=MiB, block_size=512)
    assert vol.lookup(a) == xleases.LeaseInfo(sd, a, path, 3 * MiB)
    assert vol.lookup(b).offset == 5 * MiB
    with pytest.raises(errors.NoSuchLease) as e:
        vol.lookup(half)  # VDSM: an updating record is a missing lease
    assert e.value.code == 936 and e.value.message == f"No such lease: 'lease={half}'"
    assert vol.leases() == {a: {"offset": 3 * MiB, "updating": False},
                            b: {"offset": 5 * MiB, "updating": False},
                            half: {"offset": 45 * MiB, "updating": True}}
    with pytest.raises(errors.NoSuchLease):
        vol.lookup(new_id())
    # An id longer than a record's 48 bytes must not match the lease it starts with.
    with pytest.raises(errors.InvalidParameterException):
        vol.lookup(a + "-and-more-than-48-bytes")


@pytest.mark.parametrize(("offset", "data", "error"), [
    (0, b"\0\0\0\0", errors.InvalidIndexMetadata),  # bad magic
    (5, b"blah", errors.InvalidIndexMetadata),  # bad version
    (5, b"0002", errors.InvalidIndexMetadata),  # unsupported version
    (10, b"\xf0", errors.InvalidIndexMetadata),  # lockspace not ascii
    (59, b"not a number", errors.InvalidIndexMetadata),  # mtime
    (70, b"u", errors.IndexIsUpdating),  # a format or rebuild was interrupted
])
def test_unusable_index_is_refused(tmp_path: Path, offset: int, data: bytes,
                                   error: type[errors.InvalidIndex]) -> None:
    index = bytearray(vdsm_index(new_id(), {}))
    index[offset:offset + len(data)] = data
    path = volume(tmp_path, bytes(index))
    with pytest.raises(error) as e:
        xleases.LeasesVolume(path, alignment=MiB, block_size=512)
    assert e.value.code == 100  # VDSM's xlease errors are uncoded: 100 and their text
    assert "must be formatted or rebuilt" in e.value.message


def test_truncated_and_unformatted_volumes(tmp_path: Path) -> None:
    path = tmp_path / "xleases"
    path.touch()
    assert xleases.is_unformatted(str(path), alignment=MiB, block_size=512)
    with pytest.raises(errors.TruncatedIndex):
        xleases.LeasesVolume(str(path), alignment=MiB, block_size=512)
    with open(path, "wb") as f:
        f.truncate(4 * MiB)  # zeros: never formatted, not corrupted
    assert xleases.is_unformatted(str(path), alignment=MiB, block_size=4096)
    xleases.format_index("sd", str(path), alignment=MiB, block_size=4096)
    assert not xleases.is_unformatted(str(path), alignment=MiB, block_size=4096)


def test_record_layout_round_trip() -> None:
    rec = xleases.Record("lease", 3 * MiB, updating=True)
    assert rec.to_bytes() == vdsm_record("lease", 3 * MiB, updating=True)
    assert xleases.Record.from_bytes(rec.to_bytes()) == rec
    with pytest.raises(errors.InvalidRecord):
        xleases.Record.from_bytes(b"\0" * 64)  # a zeroed record cannot be parsed


# --- Lease.* on real domains ----------------------------------------------------------------

@pytest.fixture(scope="module")
def domains(module_env: StorageEnv) -> SharedDomains:
    return SharedDomains(module_env, name="xleases").build("posixfs", "block-512", "block-4k")


@pytest.fixture(params=["posixfs", "block-512", "block-4k"])
def dom(request: pytest.FixtureRequest, domains: SharedDomains) -> Iterator[DomainUnderTest]:
    with domains.lend(request.param) as d:
        yield d


def lease(dom: DomainUnderTest, lease_id: str) -> dict[str, Any]:
    return {"lease": {"sd_id": dom.sd, "lease_id": lease_id}}


def geometry(dom: DomainUnderTest) -> tuple[int, int]:
    with dom.client as c:
        info = c.call("StorageDomain.getInfo", {"storagedomainID": dom.sd})
    return int(info["block_size"]), int(info["alignment"])


def read_resource(host: SimHost, path: str, offset: int, align: int,
                  sector: int) -> dict[str, Any] | None:
    """The sanlock resource at path:offset, read through the host's sanlock daemon (the
    binding reads SANLOCK_RUN_DIR once per process: a child process each time)."""
    script = (
        "import json, sys\n"
        "from vdsmlite.locking import sanlock\n"
        "p, o, a, s = sys.argv[1], *map(int, sys.argv[2:])\n"
        "try:\n"
        "    r = sanlock.read_resource(p, o, align=a, sector=s)\n"
        "except sanlock.SanlockError as e:\n"
        "    print(json.dumps(e.errno)); sys.exit()\n"
        "print(json.dumps([r.lockspace, r.name, r.version]))\n")
    out = subprocess.run([sys.executable, "-c", script, path, str(offset), str(align),
                          str(sector)], env={**os.environ, **host.sanlock.env,
                                             "PYTHONPATH": str(Path(__file__).parents[1])},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    value = json.loads(out)
    if isinstance(value, int):
        assert value == 223, value  # SANLK_LEADER_MAGIC: no lease there
        return None
    return {"lockspace": value[0], "resource": value[1], "version": value[2]}


def host_of(domains: SharedDomains) -> SimHost:
    return domains.host


def create(dom: DomainUnderTest, lease_id: str) -> dict[str, Any]:
    with dom.client as c:
        return wait_task(c, c.call("Lease.create", lease(dom, lease_id)))


@pytest.mark.root
def test_lease_lifecycle(dom: DomainUnderTest, domains: SharedDomains) -> None:
    block_size, alignment = geometry(dom)
    a, b = new_id(), new_id()
    for lid in (a, b):
        assert create(dom, lid)["taskResult"] == "success"
    with dom.client as c:
        info = c.call("Lease.info", lease(dom, a))
        info_b = c.call("Lease.info", lease(dom, b))
    assert info["sd_id"] == dom.sd and info["lease_id"] == a
    assert info["offset"] % alignment == 0 and info["offset"] >= 3 * alignment
    assert info_b["offset"] != info["offset"]
    expected = ("xleases" if dom.kind == "posixfs"
                else f"{dom.sd}/xleases")
    assert info["path"].endswith(expected), info["path"]
    # The sanlock resource is where the index says, named as VDSM names it.
    res = read_resource(host_of(domains), info["path"], info["offset"], alignment, block_size)
    assert res is not None
    assert (res["lockspace"], res["resource"]) == (dom.sd, a)
    # The index record on storage is VDSM's, at the record number the offset implies.
    recnum = info["offset"] // alignment - 3
    index = read_direct(info["path"], alignment, xleases.INDEX_SIZE)
    rec = index[512 + recnum * 64:512 + (recnum + 1) * 64]
    assert rec == vdsm_record(a, info["offset"])
    assert index[:4] == b"\x12\x15\x20\x16"

    with dom.client as c:
        status = c.call("Lease.status", lease(dom, a))
    assert status == {"owners": [], "version": None}

    # Creating it again: VDSM's task succeeds and the lease stays where it was.
    assert create(dom, a)["taskResult"] == "success"
    with dom.client as c:
        assert c.call("Lease.info", lease(dom, a)) == info
        run_task(c, "Lease.delete", lease(dom, a))
        assert code_of(dom.agent, "Lease.info", **lease(dom, a)) == 936
        # Deleting a missing lease: VDSM's task succeeds too.
        st = wait_task(c, c.call("Lease.delete", lease(dom, a)))
        assert st["taskResult"] == "success"
        assert code_of(dom.agent, "Lease.status", **lease(dom, a)) == 936
        assert c.call("Lease.info", lease(dom, b)) == info_b
        run_task(c, "Lease.delete", lease(dom, b))
    # A removed lease's resource is overwritten with empty names, as VDSM does.
    res = read_resource(host_of(domains), info["path"], info["offset"], alignment,
                        block_size)
    assert res is not None and (res["lockspace"], res["resource"]) == ("", "")
    index = read_direct(info["path"], alignment, xleases.INDEX_SIZE)
    assert index[512 + recnum * 64:512 + (recnum + 1) * 64] == FREE


@pytest.mark.root
def test_rebuild_restores_wiped_records(dom: DomainUnderTest) -> None:
    _, alignment = geometry(dom)
    ids = [new_id() for _ in range(3)]
    for lid in ids:
        create(dom, lid)
    with dom.client as c:
        infos = {lid: c.call("Lease.info", lease(dom, lid)) for lid in ids}
    path = infos[ids[0]]["path"]
    # Wipe every record (keep the metadata block): the leases are gone from the index.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * (xleases.INDEX_SIZE - 512), alignment + 512)
        os.fsync(fd)
    finally:
        os.close(fd)
    for lid in ids:
        assert code_of(dom.agent, "Lease.info", **lease(dom, lid)) == 936
    with dom.client as c:
        run_task(c, "Lease.rebuild_leases", {"sd_id": dom.sd})
        for lid in ids:
            assert c.call("Lease.info", lease(dom, lid)) == infos[lid]
        for lid in ids:
            run_task(c, "Lease.delete", lease(dom, lid))


@pytest.mark.root
def test_bad_params_change_nothing(dom: DomainUnderTest) -> None:
    lid = new_id()
    agent = dom.agent
    for bad in ({"sd_id": "not-a-uuid", "lease_id": lid}, {"sd_id": dom.sd, "lease_id": "x"},
                {"sd_id": dom.sd}, "a string"):
        for verb in ("Lease.create", "Lease.delete", "Lease.info", "Lease.status"):
            assert code_of(agent, verb, lease=bad) == INVALID_PARAMS
    assert code_of(agent, "Lease.rebuild_leases", sd_id="nope") == INVALID_PARAMS
    # Lease metadata (an LVB) is not kept: refused before any task starts.
    assert code_of(agent, "Lease.create", **lease(dom, lid), metadata={"type": "JOB"}) == 75
    # Unknown domain: 358 at once.
    unknown = {"sd_id": new_id(), "lease_id": lid}
    for verb in ("Lease.create", "Lease.delete", "Lease.info"):
        assert code_of(agent, verb, lease=unknown) == 358
    assert code_of(agent, "Lease.info", **lease(dom, lid)) == 936


# --- domains of their own: creation, crashes, local domains --------------------------------


@pytest.mark.root
def test_local_domain_has_an_index_but_no_lease_changes(env: StorageEnv) -> None:
    agent = env.agent()
    dom = make_localfs_domain(agent, env.tmp_path / "local")
    assert dom.data_dir is not None
    path = dom.data_dir / dom.sd / "dom_md" / "xleases"
    assert path.read_bytes()[MiB:MiB + 4] == b"\x12\x15\x20\x16"
    lid = new_id()
    assert code_of(agent, "Lease.info", **lease(dom, lid)) == 936
    assert code_of(agent, "Lease.create", **lease(dom, lid)) == 75


@pytest.mark.root
def test_crash_mid_add_leaves_no_lease_and_a_recoverable_slot(env: StorageEnv) -> None:
    agent = env.agent(env={"VDSMLITE_FAILPOINTS": "xleases.add.after_resource"})
    host = env.hosts[-1]
    dom = make_posixfs_domain(agent, env.farm)
    assert dom.data_dir is not None
    block_size, alignment = geometry(dom)
    path = str(dom.data_dir / dom.sd / "dom_md" / "xleases")
    lid = new_id()
    with agent.client() as c:
        c.call("Lease.create", lease(dom, lid))
    assert agent.wait(60) == -9  # killed between the resource and the record
    assert "failpoint xleases.add.after_resource" in agent.log_text()
    agent.extra_env = {}
    agent.start()
    join_lockspace(agent, dom.sd)
    # The resource was written but no record names it: VDSM's "no such lease".
    res = read_resource(host, path, 3 * alignment, alignment, block_size)
    assert res is not None and res["resource"] == lid
    assert code_of(agent, "Lease.info", **lease(dom, lid)) == 936
    # A rebuild clears the leftover resource (the index is the truth)...
    with agent.client() as c:
        run_task(c, "Lease.rebuild_leases", {"sd_id": dom.sd})
    res = read_resource(host, path, 3 * alignment, alignment, block_size)
    assert res is not None and res["resource"] == ""
    # ...and the slot is used again by the next create.
    create(dom, lid)
    with agent.client() as c:
        assert c.call("Lease.info", lease(dom, lid))["offset"] == 3 * alignment
        run_task(c, "Lease.delete", lease(dom, lid))


@pytest.mark.root
def test_never_formatted_index_is_formatted_by_the_first_change(env: StorageEnv) -> None:
    agent = env.agent()
    dom = make_posixfs_domain(agent, env.farm)
    assert dom.data_dir is not None
    path = dom.data_dir / dom.sd / "dom_md" / "xleases"
    os.truncate(path, 0)  # as a domain made before the index was formatted at creation
    lid = new_id()
    assert code_of(agent, "Lease.info", **lease(dom, lid)) == 936
    create(dom, lid)
    with agent.client() as c:
        assert c.call("Lease.info", lease(dom, lid))["offset"] == 3 * MiB
        run_task(c, "Lease.delete", lease(dom, lid))
    assert path.read_bytes()[MiB:MiB + 4] == b"\x12\x15\x20\x16"

