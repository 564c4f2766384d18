"""StoragePool.connectStorageServer / disconnectStorageServer and iSCSI discovery.

localfs, posixfs (ext4 on a loop LUN) and bind mounts run for real. NFS cannot
mount here (no nfs kernel module) and iSCSI cannot log in (no iscsi_tcp module,
no iscsid): those tests drive the real mount.nfs and iscsiadm binaries into
their real failures and check the error codes and the cleanup, and say so in
their names.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from fake_storage.agent import Agent
from fake_storage.lunfarm import LunFarm
from tests.helpers import BLANK_UUID
from vdsmlite.errors import StorageDomainIllegalRemotePath
from vdsmlite.storage import connections, iscsi, mountinfo

pytestmark = pytest.mark.root

NFS, FCP, ISCSI, LOCALFS, CIFS, POSIXFS = 1, 2, 3, 4, 5, 6


def connect(agent: Agent, domain_type: int, *conns: dict[str, Any]) -> list[int]:
    with agent.client() as c:
        result = c.call("StoragePool.connectStorageServer", {
            "storagepoolID": BLANK_UUID, "domainType": domain_type,
            "connectionParams": list(conns)})
    assert [r["id"] for r in result] == [c["id"] for c in conns]
    return [r["status"] for r in result]


def disconnect(agent: Agent, domain_type: int, *conns: dict[str, Any]) -> list[int]:
    with agent.client() as c:
        result = c.call("StoragePool.disconnectStorageServer", {
            "storagepoolID": BLANK_UUID, "domainType": domain_type,
            "connectionParams": list(conns)})
    return [r["status"] for r in result]


def mnt(agent: Agent) -> Path:
    return agent.state_dir / "data-center" / "mnt"


def is_mounted(path: Path) -> bool:
    return mountinfo.find(str(path)) is not None


@pytest.fixture
def ext4_lun(lun_farm: LunFarm) -> str:
    lun = lun_farm.add("64M")
    subprocess.run(["mkfs.ext4", "-q", lun.loop], check=True)
    return lun.loop


@pytest.fixture
def mounts_cleanup(agent: Agent) -> Any:
    """Whatever a failing test left mounted under this agent's repository is unmounted."""
    yield
    for m in reversed(mountinfo.read()):
        if m.mountpoint.startswith(str(agent.state_dir)):
            subprocess.run(["umount", "-l", m.mountpoint], check=False)


# --- localfs ---------------------------------------------------------------------


def test_localfs_links_the_directory(agent: Agent, tmp_path: Path) -> None:
    data = tmp_path / "data_images"
    data.mkdir()
    conn = {"id": str(uuid.uuid4()), "connection": str(data)}
    assert connect(agent, LOCALFS, conn) == [0]
    link = mnt(agent) / str(data).replace("_", "__").replace("/", "_")
    assert link.is_symlink() and os.readlink(link) == str(data)
    assert connect(agent, LOCALFS, conn) == [0]  # idempotent
    assert disconnect(agent, LOCALFS, conn) == [0]
    assert not link.exists()
    assert data.is_dir()  # the data itself is never touched


@pytest.mark.parametrize(("path", "code"), [
    # VDSM (storageServer.LocalDirectoryConnection.checkTarget) answers 1000
    # (InvalidParameterException) for a path that is not a directory; "/" and
    # un-normalized paths it would link, vdsmlite refuses with the same code.
    ("/nonexistent/dir", 1000),
    ("relative/dir", 1000),
    ("/tmp/../etc", 1000),
    ("/", 1000),
])
def test_localfs_bad_paths(shared_agent: Agent, path: str, code: int) -> None:
    agent = shared_agent
    assert connect(agent, LOCALFS, {"id": str(uuid.uuid4()), "connection": path}) == [code]
    assert not mnt(agent).exists() or not any(mnt(agent).iterdir())


def test_localfs_file_is_not_a_directory(shared_agent: Agent, tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    assert connect(shared_agent, LOCALFS, {"id": str(uuid.uuid4()), "connection": str(f)}) == [1000]


# --- posixfs ---------------------------------------------------------------------


def test_posixfs_mounts_and_unmounts(agent: Agent, ext4_lun: str, mounts_cleanup: Any) -> None:
    conn = {"id": str(uuid.uuid4()), "connection": ext4_lun, "vfs_type": "ext4",
            "mnt_options": "noatime"}
    assert connect(agent, POSIXFS, conn) == [0]
    mountpoint = mnt(agent) / ext4_lun.replace("/", "_")
    m = mountinfo.find(str(mountpoint))
    assert m is not None and m.fstype == "ext4" and m.source == ext4_lun
    assert "noatime" in m.options
    assert connect(agent, POSIXFS, conn) == [0]  # idempotent: still one mount
    assert sum(1 for x in mountinfo.read() if x.mountpoint == str(mountpoint)) == 1
    assert disconnect(agent, POSIXFS, conn) == [0]
    assert not is_mounted(mountpoint)
    assert not mountpoint.exists()


def test_shared_mount_is_unmounted_by_the_last_id(agent: Agent, ext4_lun: str,
                                                  mounts_cleanup: Any) -> None:
    a = {"id": str(uuid.uuid4()), "connection": ext4_lun, "vfs_type": "ext4"}
    b = {**a, "id": str(uuid.uuid4())}
    assert connect(agent, POSIXFS, a, b) == [0, 0]
    mountpoint = mnt(agent) / ext4_lun.replace("/", "_")
    assert disconnect(agent, POSIXFS, a) == [0]
    assert is_mounted(mountpoint)
    assert disconnect(agent, POSIXFS, b) == [0]
    assert not is_mounted(mountpoint)


def test_bind_mount(agent: Agent, tmp_path: Path, mounts_cleanup: Any) -> None:
    src = tmp_path / "export"
    src.mkdir()
    (src / "hello").write_text("hi")
    conn = {"id": str(uuid.uuid4()), "connection": str(src), "vfs_type": "none",
            "mnt_options": "bind"}
    assert connect(agent, POSIXFS, conn) == [0]
    mountpoint = mnt(agent) / str(src).replace("_", "__").replace("/", "_")
    assert (mountpoint / "hello").read_text() == "hi"
    assert connect(agent, POSIXFS, conn) == [0]  # recognised as already mounted
    assert disconnect(agent, POSIXFS, conn) == [0]
    assert not mountpoint.exists()


def test_failed_mount_leaves_no_directory(agent: Agent, ext4_lun: str) -> None:
    wrong_fs = {"id": str(uuid.uuid4()), "connection": ext4_lun, "vfs_type": "xfs"}
    no_device = {"id": str(uuid.uuid4()), "connection": "/dev/vdsmlite-no-such-device",
                 "vfs_type": "ext4"}
    assert connect(agent, POSIXFS, wrong_fs, no_device) == [477, 477]
    assert not mnt(agent).exists() or list(mnt(agent).iterdir()) == []
    # Nothing recorded: a later disconnect has nothing to undo.
    assert disconnect(agent, POSIXFS, wrong_fs) == [0]


@pytest.mark.parametrize(("spec", "options", "code"), [
    ("/dev/../etc", "", 390),
    ("server:/exports/../../etc", "", 390),
    ("", "", 390),
    ("server:relative", "", 390),
    ("/dev/loop0", "rw, suid", 1000),  # space: not a mount option list
    ("/dev/loop0", "rw\nx", 1000),
])
def test_posixfs_bad_specs_are_refused_before_mounting(shared_agent: Agent, spec: str,
                                                       options: str, code: int) -> None:
    conn = {"id": str(uuid.uuid4()), "connection": spec, "vfs_type": "ext4",
            "mnt_options": options}
    assert connect(shared_agent, POSIXFS, conn) == [code]
    assert not mnt(shared_agent).exists() or not any(mnt(shared_agent).iterdir())


def test_id_reused_with_other_params_is_refused(agent: Agent, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cid = str(uuid.uuid4())
    assert connect(agent, LOCALFS, {"id": cid, "connection": str(a)}) == [0]
    assert connect(agent, LOCALFS, {"id": cid, "connection": str(b)}) == [478]
    assert disconnect(agent, LOCALFS, {"id": cid, "connection": str(a)}) == [0]


def test_disconnect_leaves_mounts_this_host_did_not_make(agent: Agent, ext4_lun: str,
                                                         mounts_cleanup: Any) -> None:
    mountpoint = mnt(agent) / ext4_lun.replace("/", "_")
    mountpoint.mkdir(parents=True)
    subprocess.run(["mount", "-t", "ext4", ext4_lun, str(mountpoint)], check=True)
    try:
        conn = {"id": str(uuid.uuid4()), "connection": ext4_lun, "vfs_type": "ext4"}
        assert disconnect(agent, POSIXFS, conn) == [0]
        assert is_mounted(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


def test_registry_survives_restart(agent_factory: Any, ext4_lun: str, tmp_path: Path) -> None:
    a = agent_factory("restarting")
    conn = {"id": str(uuid.uuid4()), "connection": ext4_lun, "vfs_type": "ext4"}
    try:
        assert connect(a, POSIXFS, conn) == [0]
        mountpoint = mnt(a) / ext4_lun.replace("/", "_")
        assert a.stop() == 0
        assert is_mounted(mountpoint)  # mounts outlive the daemon, as with VDSM
        a.start()
        assert connect(a, POSIXFS, conn) == [0]  # adopted, not mounted twice
        assert disconnect(a, POSIXFS, conn) == [0]
        assert not is_mounted(mountpoint)
    finally:
        for m in reversed(mountinfo.read()):
            if m.mountpoint.startswith(str(a.state_dir)):
                subprocess.run(["umount", "-l", m.mountpoint], check=False)


def test_unsupported_domain_type(shared_agent: Agent) -> None:
    conn = {"id": str(uuid.uuid4()), "connection": "//s/share"}
    assert connect(shared_agent, CIFS, conn) == [372]


def test_fcp_connect_is_a_rescan(agent: Agent) -> None:
    conn = {"id": str(uuid.uuid4())}
    assert connect(agent, FCP, conn) == [0]
    assert disconnect(agent, FCP, conn) == [0]


# --- NFS: the real mount.nfs, which fails here ---------------------------------------------


def test_nfs_options_follow_vdsm() -> None:
    repo = Path("/rhev/data-center")
    base = {"id": str(uuid.uuid4()), "connection": "nfs1.example.com:/exports/data_1/"}
    c = connections.parse(NFS, {**base, "protocol_version": "3"}, repo)
    assert c.options == "soft,nosharecache,timeo=100,retrans=3,nfsvers=3,nolock"
    assert c.path == "/rhev/data-center/mnt/nfs1.example.com:_exports_data__1"
    assert c.remote == "nfs1.example.com:/exports/data_1"
    c = connections.parse(NFS, {**base, "protocol_version": "4.2", "retrans": "6",
                                "timeout": "600", "mnt_options": "sec=krb5"}, repo)
    assert c.options == "soft,nosharecache,timeo=600,retrans=6,nfsvers=4,minorversion=2,sec=krb5"
    # VDSM's _connectionDict2ConnectionInfo: no protocol_version means "3"; a v3 or
    # negotiated mount gets "nolock" after the engine's options unless they say lock.
    c = connections.parse(NFS, {**base, "protocol_version": "auto"}, repo)
    assert c.options == "soft,nosharecache,timeo=100,retrans=3,nolock"
    c = connections.parse(NFS, base, repo)
    assert c.options == "soft,nosharecache,timeo=100,retrans=3,nfsvers=3,nolock"
    c = connections.parse(NFS, {**base, "mnt_options": "lock,sec=sys"}, repo)
    assert c.options == "soft,nosharecache,timeo=100,retrans=3,nfsvers=3,lock,sec=sys"
    c = connections.parse(NFS, {**base, "protocol_version": "4.1", "mnt_options": "nolock"},
                          repo)
    assert c.options == "soft,nosharecache,timeo=100,retrans=3,nfsvers=4,minorversion=1,nolock"
    c = connections.parse(NFS, {**base, "connection": "[fd00::1]:/export"}, repo)
    assert c.path == "/rhev/data-center/mnt/[fd00::1]:_export"
    with pytest.raises(StorageDomainIllegalRemotePath):
        connections.parse(NFS, {**base, "connection": "/local/path"}, repo)


def test_nfs_mount_failure_is_477_and_cleaned_no_nfs_kernel_module_here(
        shared_agent: Agent) -> None:
    agent = shared_agent
    conn = {"id": str(uuid.uuid4()), "connection": "127.0.0.1:/exports/data",
            "protocol_version": "4"}
    assert connect(agent, NFS, conn) == [477]
    assert not mnt(agent).exists() or list(mnt(agent).iterdir()) == []
    assert "Problem while trying to mount target" in agent.log_text()


# --- iSCSI: the real iscsiadm, which cannot log in here -----------------------------------


def node_record(iqn: str) -> Path:
    return Path("/etc/iscsi/nodes") / iqn


def test_iscsi_node_record_with_chap_no_kernel_initiator_here() -> None:
    """Node creation and CHAP settings are real iscsiadm DB writes; only login needs iscsid."""
    iqn = f"iqn.2026-11.test.vdsmlite:{uuid.uuid4().hex[:12]}"
    target = iscsi.Target("127.0.0.1", 13260, iqn, tpgt=1)
    adm = iscsi.Iscsiadm(timeout=30)

    async def main() -> None:
        await adm.add_node(target, iscsi.Chap("vdsmuser", "s3cr3t-pw"))
        try:
            record = next(node_record(iqn).rglob("default")).read_text()
            assert "node.session.auth.authmethod = CHAP" in record
            assert "node.session.auth.username = vdsmuser" in record
            assert "node.session.auth.password = s3cr3t-pw" in record
            assert await adm.node_exists(target)
        finally:
            await adm.delete_node(target)
        assert not await adm.node_exists(target)
    asyncio.run(main())
    assert not node_record(iqn).exists()


def test_iscsi_failed_login_leaves_no_node_no_kernel_initiator_here(
        shared_agent: Agent) -> None:
    agent = shared_agent
    iqn = f"iqn.2026-11.test.vdsmlite:{uuid.uuid4().hex[:12]}"
    conn = {"id": str(uuid.uuid4()), "connection": "127.0.0.1", "port": "13260", "iqn": iqn,
            "tpgt": "1", "user": "chapuser", "password": "chap-secret-123"}
    try:
        assert connect(agent, ISCSI, conn) == [464]
        assert not node_record(iqn).exists()
        log = agent.log_text()
        assert "Failed to login to iSCSI node" in log
        assert "chap-secret-123" not in log  # the password never reaches a log line
    finally:
        subprocess.run(["iscsiadm", "-m", "node", "-T", iqn, "-o", "delete"],
                       capture_output=True)


@pytest.mark.parametrize(("field", "value"), [
    ("iqn", "not an iqn"), ("iqn", ""), ("connection", "bad host!"), ("port", "99999"),
    ("port", "http"), ("ifaceName", "../x"), ("user", "only-user"),
])
def test_iscsi_bad_params(shared_agent: Agent, field: str, value: str) -> None:
    conn = {"id": str(uuid.uuid4()), "connection": "10.35.0.10", "port": "3260",
            "iqn": "iqn.2003-01.org.linux-iscsi.storage:target1", field: value}
    assert connect(shared_agent, ISCSI, conn) == [1000]


def test_discovery_fails_with_475_no_iscsi_transport_module_here(shared_agent: Agent) -> None:
    agent = shared_agent
    with agent.client() as c, pytest.raises(Exception) as e:
        c.call("ISCSIConnection.discoverSendTargets",
               {"host": "127.0.0.1", "port": "13260", "user": "u", "password": "pw-xyz-987"})
    assert getattr(e.value, "code", None) == 475
    assert "pw-xyz-987" not in agent.log_text()
    # The temporary discovery record is gone.
    out = subprocess.run(["iscsiadm", "-m", "discoverydb"], capture_output=True, text=True)
    assert "127.0.0.1:13260" not in out.stdout


def test_discovery_param_validation(shared_agent: Agent) -> None:
    with shared_agent.client() as c:
        for params, code in (({"host": "bad host", "port": 3260}, 1000),
                             ({"host": "10.0.0.1", "port": 0}, -32602),
                             ({"host": "10.0.0.1", "port": 3260, "user": "u"}, 1000)):
            with pytest.raises(Exception) as e:
                c.call("ISCSIConnection.discoverSendTargets", params)
            assert getattr(e.value, "code", None) == code, params


def test_discovery_output_parsing() -> None:
    out = ("10.35.0.10:3260,1 iqn.2003-01.org.linux-iscsi.t1:target1\n"
           "10.35.0.11:3260,2 iqn.2003-01.org.linux-iscsi.t1:target1\n"
           "[fd00::10]:3260,1 iqn.2003-01.org.linux-iscsi.t1:target1\n"
           "iscsiadm: some warning\n")
    assert iscsi.parse_discovery(out, ipv6_enabled=False) == [
        "10.35.0.10:3260,1 iqn.2003-01.org.linux-iscsi.t1:target1",
        "10.35.0.11:3260,2 iqn.2003-01.org.linux-iscsi.t1:target1"]
    assert iscsi.parse_discovery(out, ipv6_enabled=True)[2] == \
        "[fd00::10]:3260,1 iqn.2003-01.org.linux-iscsi.t1:target1"
