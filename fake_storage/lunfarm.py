"""A LUN farm made of loop devices with SCSI identities.

Each LUN is a sparse file behind a loop device (512- or 4096-byte logical
sectors). Its SCSI identity is written exactly where udev would put it on a
real host: the udev database file ``/run/udev/data/b<major>:<minor>``
(``ID_SERIAL``, ``ID_WWN``, ``ID_VENDOR``, ``ID_MODEL``, ``ID_PATH``, ...) and
the ``/dev/disk/by-id`` and ``by-path`` symlinks. libudev reads those files, so
the daemon discovers these LUNs through pyudev without knowing the difference.
GUIDs look like the NAA WWIDs of a LIO target (``36001405`` + 25 hex digits);
``ID_PATH`` says whether the LUN is reached over iSCSI (portal, iqn, lun) or FC.

Everything created is recorded in ``<dir>/lunfarm.json``; `destroy` removes
exactly that, and refuses to detach a loop device whose backing file is not
the farm's own, or to delete a udev file or symlink it did not write.

A LUN is cached in this host's memory by default (the loop writes its file
through the page cache: cheap for tests full of small metadata writes). With
``host_cache=False`` the loop reads and writes the file with direct I/O, as a
SAN LUN keeps nothing in the host: what a benchmark of large writes needs, or
the kernel's copying into and flushing of that cache takes CPU from what is
measured (measured on 1 GiB OVF_STORE uploads: the agent's write lane fell
behind at times with the cache, never without).

A farm made by a program (a test session, a benchmark) records that process;
`reap_orphans` removes farms whose process is gone, so a run that was killed
(loop devices and udev files are kernel and tmpfs state: they outlive it) does
not leave LUNs that the next run would see. Farms made from the command line
are persistent and only go away with ``lunfarm destroy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

UDEV_DATA = Path("/run/udev/data")
BY_ID = Path("/dev/disk/by-id")
BY_PATH = Path("/dev/disk/by-path")
MARKER = "FAKE_STORAGE_LUNFARM"
# Farms owned by a process are also listed here (a file naming the farm dir): a
# test worker with a udev database of its own (tests/conftest.py) takes its udev
# files with it when it dies, and the reaper must still find its loop devices.
REGISTRY = Path("/run/fake-storage-farms")


class FarmError(Exception):
    pass


@dataclass
class FakeLun:
    guid: str
    backing: str
    loop: str
    major: int
    minor: int
    size: int
    sector_size: int
    vendor: str
    model: str
    serial: str
    revision: str
    transport: str  # "iscsi" or "fc"
    id_path: str
    portal: str = ""
    iqn: str = ""
    lun: int = 0
    wwpn: str = ""
    udev_file: str = ""
    links: list[str] = field(default_factory=list)

    @property
    def devnum(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def name(self) -> str:
        return os.path.basename(self.loop)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _run(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise FarmError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def _loop_backing(loop: str) -> str | None:
    """The file behind a loop device right now, or None if it is detached."""
    name = os.path.basename(loop)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _detach(loop: str, timeout: float = 10.0) -> None:
    """Detach a loop device and wait until the kernel has let go of its file. A device
    somebody still holds open (udev's blkid probe after a change, a late reader) is
    only marked to detach at its last close, and `losetup --detach` returns at once:
    a caller that then reuses the number, or checks nothing is left, must wait."""
    _run("losetup", "--detach", loop)
    deadline = time.monotonic() + timeout
    while _loop_backing(loop) is not None:
        if time.monotonic() > deadline:
            raise FarmError(f"{loop}: still attached {timeout:.0f}s after its detach "
                            "(somebody holds it open)")
        time.sleep(0.02)  # the kernel gives no event to wait on here


def _loop_dio(loop: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(loop)}/loop/dio").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot, or None if it is gone.

    A pid alone can be reused; pid + start time names one process for good.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name (which may hold spaces).
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(owner: dict[str, int]) -> bool:
    return _process_start(owner["pid"]) == owner["start"]


class LunFarm:
    def __init__(self, directory: Path, *, persistent: bool = False, vendor: str = "LIO-ORG",
                 initiator_portal: str = "10.35.0.10:3260",
                 iqn: str = "iqn.2003-01.org.linux-iscsi.storage:target1",
                 host_cache: bool = True) -> None:
        self.dir = Path(directory).absolute()
        self.host_cache = host_cache
        self.manifest = self.dir / "lunfarm.json"
        self.vendor = vendor
        self.portal = initiator_portal
        self.iqn = iqn
        self.luns: list[FakeLun] = []
        self.owner: dict[str, int] | None = None
        if not persistent:
            pid = os.getpid()
            self.owner = {"pid": pid, "start": _process_start(pid) or 0}
        if self.manifest.exists():
            saved = json.loads(self.manifest.read_text())
            self.luns = [FakeLun(**d) for d in saved["luns"]]
            self.owner = saved.get("owner")

    # --- creation ----------------------------------------------------------------

    def create(self, count: int, size: int | str, *, sector_size: int = 512,
               transport: str = "iscsi", model: str | None = None) -> list[FakeLun]:
        return [self.add(size, sector_size=sector_size, transport=transport, model=model)
                for _ in range(count)]

    def add(self, size: int | str, *, sector_size: int = 512, transport: str = "iscsi",
            model: str | None = None, lun_number: int | None = None) -> FakeLun:
        if transport not in ("iscsi", "fc"):
            raise FarmError(f"unknown transport {transport!r}")
        if sector_size not in (512, 4096):
            raise FarmError("sector size must be 512 or 4096")
        self.dir.mkdir(parents=True, exist_ok=True)
        size = parse_size(size)
        naa = "6001405" + secrets.token_hex(13)[:25]
        guid = "3" + naa
        backing = self.dir / f"{guid}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        number = lun_number if lun_number is not None else len(self.luns)
        loop = _run("losetup", "--find", "--show", "--sector-size", str(sector_size),
                    *([] if self.host_cache else ["--direct-io=on"]), str(backing)).strip()
        st = os.stat(loop)
        lun = FakeLun(
            guid=guid, backing=str(backing), loop=loop,
            major=os.major(st.st_rdev), minor=os.minor(st.st_rdev), size=size,
            sector_size=sector_size, vendor=self.vendor, model=model or f"lun{number}",
            serial=str(uuid.uuid4()), revision="4.0", transport=transport,
            id_path="", lun=number)
        if transport == "iscsi":
            lun.portal, lun.iqn = self.portal, self.iqn
            lun.id_path = f"ip-{self.portal}-iscsi-{self.iqn}-lun-{number}"
        else:
            lun.wwpn = "0x" + "5006016" + secrets.token_hex(5)[:9]
            lun.id_path = f"pci-0000:41:00.0-fc-{lun.wwpn}-lun-{number}"
        # Record before publishing the identity, so a failure below is still cleaned up.
        self.luns.append(lun)
        self._save()
        if not self.host_cache and _loop_dio(loop) != "1":
            # losetup falls back to cached I/O where the file system cannot do direct
            # I/O at this sector size, and says nothing.
            raise FarmError(f"{loop}: direct I/O to {backing} refused by the kernel")
        self._publish(lun)
        self._save()
        return lun

    def _publish(self, lun: FakeLun) -> None:
        naa = lun.guid[1:]
        links = [BY_ID / f"scsi-{lun.guid}", BY_ID / f"wwn-0x{naa}", BY_PATH / lun.id_path]
        props = {
            "ID_SCSI": "1",
            "ID_VENDOR": lun.vendor,
            "ID_MODEL": lun.model,
            "ID_REVISION": lun.revision,
            "ID_TYPE": "disk",
            "ID_SERIAL": lun.guid,
            "ID_SERIAL_SHORT": naa,
            "ID_WWN": "0x" + naa[:16],
            "ID_WWN_WITH_EXTENSION": "0x" + naa,
            "ID_SCSI_SERIAL": lun.serial,
            "ID_BUS": "scsi",
            "ID_PATH": lun.id_path,
            MARKER: str(self.dir),
        }
        lines = [f"S:{link.relative_to('/dev')}" for link in links]
        lines.append(f"I:{int(time.monotonic() * 1_000_000)}")
        lines += [f"E:{k}={v}" for k, v in props.items()]
        lines += ["G:systemd", "Q:systemd", "V:1"]
        UDEV_DATA.mkdir(parents=True, exist_ok=True)
        udev_file = UDEV_DATA / f"b{lun.devnum}"
        if udev_file.exists() and MARKER not in udev_file.read_text():
            raise FarmError(f"{udev_file} exists and is not ours")
        tmp = udev_file.with_name(udev_file.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.rename(tmp, udev_file)
        lun.udev_file = str(udev_file)
        for link in links:
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if link.is_symlink():
                    link.unlink()
            link.symlink_to(os.path.relpath(lun.loop, link.parent))
            lun.links.append(str(link))

    # --- removal -----------------------------------------------------------------

    def stacked_loops(self, lun: FakeLun) -> list[str]:
        """Loop devices mapping ranges of this LUN (LV activations of a daemon)."""
        real = os.path.realpath(lun.loop)
        return [f"/dev/{p.name}" for p in Path("/sys/block").glob("loop*")
                if _loop_backing(p.name) == real]

    def remove(self, lun: FakeLun) -> None:
        """Take one LUN away (as if it vanished from the SAN): identity, loop, file.

        Loop devices a daemon stacked on the LUN (its LV mappings, left behind
        when the daemon was killed) go first: they cannot outlive the LUN.
        """
        self._unpublish(lun)
        for stacked in self.stacked_loops(lun):
            _detach(stacked)
        backing = _loop_backing(lun.loop)
        if backing is not None:
            if os.path.realpath(backing) != os.path.realpath(lun.backing):
                raise FarmError(f"{lun.loop} is backed by {backing}, not by this farm: "
                                "refusing to detach it")
            _detach(lun.loop)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lun.backing)
        self.luns = [x for x in self.luns if x.guid != lun.guid]
        self._save()

    def _unpublish(self, lun: FakeLun) -> None:
        for link in lun.links:
            p = Path(link)
            with contextlib.suppress(OSError):
                if p.is_symlink() and os.path.realpath(p) == os.path.realpath(lun.loop):
                    p.unlink()
        if lun.udev_file:
            p = Path(lun.udev_file)
            with contextlib.suppress(FileNotFoundError):
                if MARKER in p.read_text():
                    p.unlink()

    def destroy(self) -> list[str]:
        """Remove every LUN of this farm; returns problems (empty = all clean)."""
        problems = []
        for lun in list(self.luns):
            try:
                self.remove(lun)
            except (FarmError, OSError) as e:
                problems.append(str(e))
        if not problems:
            with contextlib.suppress(FileNotFoundError):
                self.manifest.unlink()
            with contextlib.suppress(FileNotFoundError):
                self._registry_entry.unlink()
        return problems

    @property
    def _registry_entry(self) -> Path:
        return REGISTRY / hashlib.sha256(str(self.dir).encode()).hexdigest()[:32]

    def _save(self) -> None:
        tmp = self.manifest.with_name("lunfarm.json.tmp")
        tmp.write_text(json.dumps({"owner": self.owner, "luns": [asdict(x) for x in self.luns]},
                                  indent=1))
        os.rename(tmp, self.manifest)
        if self.owner is not None and not self._registry_entry.exists():
            REGISTRY.mkdir(mode=0o700, exist_ok=True)
            self._registry_entry.write_text(str(self.dir))

    def by_guid(self, guid: str) -> FakeLun:
        for lun in self.luns:
            if lun.guid == guid:
                return lun
        raise KeyError(guid)


def reap_orphans() -> list[str]:
    """Remove the LUNs of farms whose creating process is gone.

    Farms are found through their udev files (the marker names the farm
    directory), so a farm whose directory was deleted is found too. Returns
    what was done or could not be done, one line each.
    """
    farm_dirs: dict[Path, list[Path]] = {}
    for udev_file in UDEV_DATA.glob("b*"):
        with contextlib.suppress(OSError):
            for line in udev_file.read_text().splitlines():
                if line.startswith(f"E:{MARKER}="):
                    farm_dirs.setdefault(Path(line.split("=", 1)[1]), []).append(udev_file)
    # Farms whose udev files went with a private udev database: by their registry entry.
    for entry in (REGISTRY.glob("*") if REGISTRY.is_dir() else []):
        with contextlib.suppress(OSError):
            farm_dir = Path(entry.read_text().strip())
            if not (farm_dir / "lunfarm.json").exists():
                entry.unlink()  # destroyed, or its directory is gone: nothing recorded
                continue
            farm_dirs.setdefault(farm_dir, [])
    report = []
    for farm_dir, udev_files in farm_dirs.items():
        if (farm_dir / "lunfarm.json").exists():
            farm = LunFarm(farm_dir)
            if farm.owner is None or _owner_alive(farm.owner):
                continue
            problems = farm.destroy()
        else:
            problems = [p for f in udev_files for p in _reap_unrecorded(farm_dir, f)]
        report.append(f"reaped orphaned farm {farm_dir}")
        report += problems
    return report


def _reap_unrecorded(farm_dir: Path, udev_file: Path) -> list[str]:
    """Remove one LUN whose farm manifest is gone, knowing only its udev file."""
    major, minor = udev_file.name[1:].split(":")
    loop = next((f"/dev/{p.name}" for p in Path("/sys/block").glob("loop*")
                 if p.joinpath("dev").read_text().strip() == f"{major}:{minor}"), None)
    problems = []
    links = [Path("/dev") / line[2:] for line in udev_file.read_text().splitlines()
             if line.startswith("S:")]
    backing = _loop_backing(loop) if loop is not None else None
    if loop is not None and backing is not None:
        if not backing.startswith(f"{farm_dir}/"):
            return [f"{loop} is backed by {backing!r}, not by {farm_dir}: left alone"]
        for p in Path("/sys/block").glob("loop*"):
            if _loop_backing(p.name) == loop:
                with contextlib.suppress(FarmError):
                    _detach(f"/dev/{p.name}")
        try:
            _detach(loop)
        except FarmError as e:
            problems.append(str(e))
    for link in links:
        with contextlib.suppress(OSError):
            if loop is not None and link.is_symlink() and os.path.realpath(link) == loop:
                link.unlink()
    udev_file.unlink(missing_ok=True)
    return problems
