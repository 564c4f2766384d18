"""The shipped systemd unit: valid for systemd, and hardened without hiding storage."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CONTRIB = Path(__file__).parent.parent / "contrib" / "systemd"


def unit() -> configparser.RawConfigParser:
    p = configparser.RawConfigParser(strict=False)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(CONTRIB / "vdsmlite.service")
    return p


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze comes with the systemd package (make test installs it)"
    exe = Path(sys.executable).parent / "vdsmlite"
    text = (CONTRIB / "vdsmlite.service").read_text().replace("/usr/bin/vdsmlite", str(exe))
    copy = tmp_path / "vdsmlite.service"
    copy.write_text(text)
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    # Dependencies (sanlock.service, ...) may be absent on a build machine; nothing else may be.
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "not found" not in line and "Failed to" not in line]
    assert out.returncode == 0 or not problems, out.stdout + out.stderr
    assert not problems, problems


def test_notify_and_watchdog() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["WatchdogSec"].rstrip("s").isdigit()
    assert "--config /etc/vdsmlite/vdsmlite.conf" in svc["ExecStart"]


@pytest.mark.parametrize("key", [
    # Each hides block devices or puts the daemon in a private mount namespace,
    # where its NFS/posixfs mounts would be invisible to the host.
    "PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock", "ProtectSystem",
    "PrivateTmp", "ReadWritePaths", "ProtectKernelTunables", "ProtectKernelModules",
    "MemoryDenyWriteExecute",
])
def test_hardening_does_not_hide_storage(key: str) -> None:
    assert key not in unit()["Service"]


def test_hardening_present() -> None:
    svc = unit()["Service"]
    for key in ("NoNewPrivileges", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality"):
        assert svc[key] == "yes"
    families = svc["RestrictAddressFamilies"].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} == set(families)
    assert "CAP_SYS_ADMIN" in svc["CapabilityBoundingSet"]  # mount, loop, block ioctls
