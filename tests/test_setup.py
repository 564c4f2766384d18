"""`make run`/`make test` install what a minimal Debian 12 lacks: the Makefile's apt lists
name the package of every program and library the agent and the tests use."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

MAKEFILE = Path(__file__).parent.parent / "Makefile"

# What the code runs (grep the sources for subprocess argv) or dlopens, and who needs it.
RUN_PROGRAMS = ["qemu-img", "qemu-system-x86_64", "systemd-run", "mount",
                "umount", "losetup", "lvm", "sanlock", "mkfs", "mkfs.ext3"]
TEST_PROGRAMS = ["qemu-io", "mkfs.ext4", "blkid", "lsblk", "findmnt", "setpriv",
                 "unshare", "iscsiadm", "mount.nfs", "openssl", "curl"]
RUN_LIBRARIES = ["libudev.so.1", "libblkid.so.1", "libsanlock_client.so.1"]


def apt_lists() -> dict[str, set[str]]:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    raw = dict(re.findall(r"^(APT_\w+)\s*:=(.*)$", text, re.M))
    out: dict[str, set[str]] = {}
    for name in ("APT_BASE", "APT_RUN", "APT_TEST", "APT_BENCH"):
        words: set[str] = set()
        for w in raw.get(name, "").split():
            m = re.fullmatch(r"\$\((APT_\w+)\)", w)
            words |= out[m.group(1)] if m else {w}
        out[name] = words
    return out


def package_of(path: str) -> str:
    real = str(Path(path).resolve())
    for candidate in (path, real, real.replace("/usr/", "/", 1)):
        res = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout.split(":", 1)[0].split(",")[0].strip()
    raise AssertionError(f"no Debian package owns {path}")


def library_path(soname: str) -> str:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith(soname + " ") and "x86-64" in line:
            return line.rsplit("=>", 1)[1].strip()
    raise AssertionError(f"{soname} not found")


def test_venv_needs_python3_venv() -> None:
    lists = apt_lists()
    assert {"python3", "python3-venv"} <= lists["APT_RUN"]
    assert lists["APT_RUN"] <= lists["APT_TEST"] <= lists["APT_BENCH"]


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian host")
def test_every_program_and_library_used_is_installed_by_make() -> None:
    lists = apt_lists()
    missing = []
    for names, listed in ((RUN_PROGRAMS, lists["APT_RUN"]),
                          (TEST_PROGRAMS, lists["APT_TEST"])):
        for exe in names:
            path = shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin")
            assert path is not None, f"{exe} is not installed here"
            pkg = package_of(path)
            if pkg not in listed:
                missing.append((exe, pkg))
    for soname in RUN_LIBRARIES:
        pkg = package_of(library_path(soname))
        if pkg not in lists["APT_RUN"]:
            missing.append((soname, pkg))
    assert missing == []
