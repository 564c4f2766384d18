"""The qemu process of a VM: its command line, starting it, finding it again, its death.

`command_line` turns a `VmDefinition` (disks prepared: `DiskSpec.path` set) into
the argv of ``qemu-system-x86_64``. Disks are ``-blockdev`` node pairs (a protocol
node, ``file`` or ``host_device``, under a ``raw``/``qcow2`` format node) plus a
``-device``; `disk_blockdevs` and `disk_device` build those as the same dicts QMP's
``blockdev-add`` / ``device_add`` take, so a disk plugged at start and one hot
plugged later (`vdsmlite.virt.qmp`) are exactly alike. Names derive from the
disk's target name (`disk_names`), so QMP finds them again after an agent
restart without any saved state.

`QemuProcess` starts qemu in its own session (it must outlive the agent), and
finds a running one again from its run dir after a restart (pidfile, then
``/proc/<pid>/cmdline`` must be our qemu for this VM's uuid and run dir, so a
reused pid cannot fool it). Death is watched the same way for both through a
pidfd (readable when the process exits, immune to pid reuse): for our own child
the exit status is known; for an adopted one (not our child) only that it died,
and the tail of ``qemu.log`` (qemu's stderr) says why.

The other devices (NICs, RNG, balloon, watchdog, console: `other_devices`) are
named from their place in the definition (``net0``, ``rng0``...), never from
anything of this host, so the same definition and config give the same command
line on any host (what migration needs). NICs attach to the netdev ``[virt]
nic_backend`` names (`nic_netdev`); by default to none.

Run dir layout: ``qmp.sock`` (QMP), ``qemu.pid`` (``-pidfile``), ``qemu.log``,
``console.sock`` (the guest console, when the VM has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdsmlite import background, errors
from vdsmlite.blocking import RunBlocking
from vdsmlite.virt.definition import (
    ConsoleTarget,
    DiskBus,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    ErrorPolicy,
    NicModel,
    NicSpec,
    RngSource,
    VmDefinition,
    WatchdogAction,
)

log = logging.getLogger("vdsmlite.virt.qemu")

QEMU_BINARY = "qemu-system-x86_64"
QMP_SOCKET = "qmp.sock"
DEBUG_QMP_SOCKET = "qmp-debug.sock"
PIDFILE = "qemu.pid"
LOGFILE = "qemu.log"
CONSOLE_SOCKET = "console.sock"

# Spare pcie-root-ports created at start: q35's root bus pcie.0 refuses hot plug, so a
# virtio disk plugged later needs an empty root port made at start.
DEFAULT_HOTPLUG_SLOTS = 8
# Every root port takes a slot of pcie.0 (32 slots; 0 and 0x1f belong to the machine,
# the SCSI controller takes one): leave room rather than fail inside qemu.
MAX_ROOT_PORTS = 24
ROOT_PORT_PREFIX = "rp"  # rp1, rp2, ... (chassis numbers match)
SCSI_CONTROLLER = "scsi0"
SCSI_BUS = "scsi0.0"
SATA_PORTS = 6  # q35's built-in ich9-ahci: buses ide.0 .. ide.5
SCSI_MAX_LUN = 16383  # virtio-scsi

# A unix socket path must fit sockaddr_un.sun_path (108 bytes with its NUL).
_SUN_PATH_MAX = 107
_LOG_TAIL = 4096

_DISK_NAME = re.compile(r"[a-z][a-z0-9]{0,19}")  # vda, sdb, hdc, sdaa...
_MACHINE = re.compile(r"q35|pc-q35-[0-9A-Za-z._-]{1,40}")
_CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CPU_FEATURE = re.compile(r"[+-]?[A-Za-z0-9_.-]{1,64}(=[A-Za-z0-9_.-]{1,64})?")
_ACCELS = frozenset({"kvm", "tcg"})


class InvalidVmConfig(errors.VdsmLiteError, ValueError):
    """A value of a definition that must not reach qemu (or that qemu cannot do).

    The caller translates it to its verb's error: `command_line` raises
    `errors.CannotCreateVM` from it, a hot plug `errors.HotplugDiskFailed`."""


# --- names and escaping -----------------------------------------------------------


def escape_opt(value: str) -> str:
    """Escape a value for qemu's ``key=value,key=value`` option syntax (``,`` -> ``,,``).

    Control characters are refused rather than escaped: no option value of ours
    needs them, and a newline in a name would reach qemu's log and our parsers."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise InvalidVmConfig(f"control character in {value!r}")
    return value.replace(",", ",,")


@dataclass(frozen=True)
class DiskNames:
    """The qemu names of one disk: block nodes (node names are at most 31 chars) and
    the device id; all derived from the disk's target name."""

    storage: str  # the protocol node: file / host_device
    format: str  # the format node: raw / qcow2; the device's drive
    device: str  # the -device id: what device_del names


def disk_names(name: str) -> DiskNames:
    if not _DISK_NAME.fullmatch(name):
        raise InvalidVmConfig(f"disk name {name!r}: expected a target name like vda or sdb")
    return DiskNames(storage=f"{name}-storage", format=f"{name}-format", device=f"disk-{name}")


def overlay_names(name: str, vol_uuid: str) -> DiskNames:
    """The nodes of a volume added under a running disk by a live snapshot: named by
    the disk and the volume (the first 16 hex digits of its UUID), so every overlay
    of a qemu's life has its own names (at most 31 characters)."""
    names = disk_names(name)
    short = vol_uuid.replace("-", "")[:16]
    return DiskNames(storage=f"{name}-{short}-s", format=f"{name}-{short}-f",
                     device=names.device)


def root_port_id(n: int) -> str:
    return f"{ROOT_PORT_PREFIX}{n}"


def is_root_port_id(qdev_id: str) -> bool:
    return re.fullmatch(rf"{ROOT_PORT_PREFIX}[0-9]+", qdev_id) is not None


# --- disks ------------------------------------------------------------------------


def check_disk(disk: DiskSpec) -> None:
    """Refuse what qemu must not see or cannot do, before anything is added."""
    disk_names(disk.name)
    if disk.device is DiskDevice.CDROM:
        # Not built yet: a cdrom needs ide-cd/scsi-cd and media change, not a disk node.
        raise InvalidVmConfig(f"disk {disk.name}: cdrom devices are not supported")
    if disk.path is None:
        raise InvalidVmConfig(f"disk {disk.name}: storage not prepared (no path)")
    path = disk.path
    if not path.startswith("/") or "\x00" in path or "\n" in path:
        raise InvalidVmConfig(f"disk {disk.name}: bad path {path!r}")
    if disk.serial is not None and not re.fullmatch(r"[\x20-\x7e]{1,36}", disk.serial):
        # 36: scsi-hd's limit (virtio-blk shows the guest only the first 20).
        raise InvalidVmConfig(f"disk {disk.name}: serial must be 1-36 printable ASCII "
                              f"characters: {disk.serial!r}")
    if disk.boot_order is not None and not 0 <= disk.boot_order <= 999:
        raise InvalidVmConfig(f"disk {disk.name}: bad boot order {disk.boot_order!r}")
    if disk.shared and disk.format is DiskFormat.COW:
        # Two writers of one qcow2 corrupt its metadata; engines share raw disks only.
        raise InvalidVmConfig(f"disk {disk.name}: a shared disk must be raw")
    if disk.bus is DiskBus.SATA:
        if not 0 <= disk.index < SATA_PORTS:
            raise InvalidVmConfig(f"disk {disk.name}: sata index {disk.index} not in "
                                  f"0..{SATA_PORTS - 1}")
        if disk.readonly:
            raise InvalidVmConfig(f"disk {disk.name}: ide-hd cannot be read-only; "
                                  "use virtio or scsi")
    elif disk.bus is DiskBus.SCSI:
        if not 0 <= disk.index <= SCSI_MAX_LUN:
            raise InvalidVmConfig(f"disk {disk.name}: scsi index {disk.index} not in "
                                  f"0..{SCSI_MAX_LUN}")
    elif disk.index < 0:
        raise InvalidVmConfig(f"disk {disk.name}: negative index")


def is_block_device(path: str) -> bool:
    """Blocking (stats the path): run it off the event loop. A missing path counts
    as a file, and qemu then says it cannot open it."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def disk_blockdevs(disk: DiskSpec, *, block: bool) -> list[dict[str, Any]]:
    """The ``blockdev-add`` arguments of a disk, protocol node first.

    `block`: the path is a block device (`is_block_device`): ``host_device`` then,
    ``file`` otherwise (qemu refuses ``file`` on a block device)."""
    check_disk(disk)
    names = disk_names(disk.name)
    ro = disk.readonly
    # O_DIRECT: the storage is shared with other hosts (and migration needs it); it is
    # also what aio=native needs. Set on both nodes so query-block reports the truth.
    cache = {"direct": True, "no-flush": False}
    protocol = {"driver": "host_device" if block else "file", "node-name": names.storage,
                "filename": disk.path, "aio": "native", "cache": cache, "read-only": ro}
    # A volume's qcow2 opens its backing chain from its own header (the chain is
    # prepared beside it); explicit per-layer nodes come with block jobs.
    fmt = {"driver": "qcow2" if disk.format is DiskFormat.COW else "raw",
           "node-name": names.format, "file": names.storage, "cache": cache, "read-only": ro}
    return [protocol, fmt]


def disk_device(disk: DiskSpec, *, port: str | None = None) -> dict[str, Any]:
    """The ``device_add`` arguments of a disk; `port` is the root port of a virtio disk."""
    check_disk(disk)
    names = disk_names(disk.name)
    dev: dict[str, Any]
    if disk.bus is DiskBus.VIRTIO:
        if port is None or not is_root_port_id(port):
            raise InvalidVmConfig(f"disk {disk.name}: a virtio disk needs a root port")
        dev = {"driver": "virtio-blk-pci", "id": names.device, "bus": port, "addr": "0x0"}
    elif disk.bus is DiskBus.SCSI:
        # libvirt's layout for virtio-scsi (target 0, the index as the LUN), so the
        # guest sees the addresses a VDSM host would give it.
        dev = {"driver": "scsi-hd", "id": names.device, "bus": SCSI_BUS,
               "channel": 0, "scsi-id": 0, "lun": disk.index}
    else:
        dev = {"driver": "ide-hd", "id": names.device, "bus": f"ide.{disk.index}"}
    dev["drive"] = names.format
    if disk.serial is not None:
        dev["serial"] = disk.serial
    if disk.boot_order is not None:
        dev["bootindex"] = disk.boot_order
    if disk.shared:
        dev["share-rw"] = True
    # VDSM's error policies: STOP pauses the VM on I/O errors (the engine resumes it
    # once storage is back); ENOSPACE lets the guest see them, pausing only on ENOSPC
    # (a thin volume to extend); REPORT shows every error to the guest.
    dev["werror"], dev["rerror"] = _ERROR_POLICY[disk.error_policy]
    return dev


_ERROR_POLICY = {
    ErrorPolicy.STOP: ("stop", "stop"),
    ErrorPolicy.ENOSPACE: ("enospc", "report"),
    ErrorPolicy.REPORT: ("report", "report"),
}


# --- the command line ---------------------------------------------------------------


def command_line(defn: VmDefinition, *, run_dir: Path,
                 hotplug_slots: int = DEFAULT_HOTPLUG_SLOTS,
                 accels: Sequence[str] = ("kvm", "tcg"),
                 binary: str = QEMU_BINARY, debug_monitor: bool = False,
                 nic_backend: str = "") -> list[str]:
    """The argv that runs `defn` with its run dir `run_dir`.

    `nic_backend` is ``[virt] nic_backend``: what the VM's NICs attach to
    (`nic_netdev`).

    `debug_monitor` adds a second QMP monitor, ``qmp-debug.sock``, for an operator
    or a test to inspect the VM while the agent holds the first (a QMP socket
    serves one client at a time).

    Blocking: stats each disk's path (block device or file); call it off the loop.
    Raises `errors.CannotCreateVM` naming what in the definition is refused.

    ``-blockdev`` and ``-device`` are given in qemu's JSON form (the dicts QMP
    takes), so definition values there need no escaping at all; the few keyval
    options that carry our values (``-name``, the socket path) are escaped."""
    try:
        argv = _command_line(defn, run_dir, hotplug_slots, accels, binary)
        argv += other_devices(defn, run_dir=Path(run_dir), nic_backend=nic_backend,
                              binary=binary)
        if debug_monitor:
            debug = escape_opt(str(Path(run_dir) / DEBUG_QMP_SOCKET))
            argv += ["-chardev", f"socket,id=qmpdebug,path={debug},server=on,wait=off",
                     "-mon", "chardev=qmpdebug,mode=control"]
        return argv
    except InvalidVmConfig as e:
        raise errors.CannotCreateVM(str(e)) from e


def _command_line(defn: VmDefinition, run_dir: Path, hotplug_slots: int,
                  accels: Sequence[str], binary: str) -> list[str]:
    vm_uuid = _canonical_uuid(defn.vm_id)
    run_dir = Path(run_dir)
    if not run_dir.is_absolute():
        raise InvalidVmConfig(f"run dir must be absolute: {run_dir}")
    qmp = str(run_dir / QMP_SOCKET)
    if len(qmp.encode()) > _SUN_PATH_MAX:
        raise InvalidVmConfig(f"run dir too long for a unix socket: {run_dir}")
    machine = defn.machine or "q35"
    if not _MACHINE.fullmatch(machine):
        # Root ports, pcie.0 and the AHCI buses below are q35's.
        raise InvalidVmConfig(f"machine {machine!r}: only q35 machine types are supported")
    if not accels or any(a not in _ACCELS for a in accels):
        raise InvalidVmConfig(f"accelerators {list(accels)!r}: expected kvm and/or tcg")
    if defn.memory_mib < 16 or defn.vcpus < 1:
        raise InvalidVmConfig(f"memory {defn.memory_mib} MiB / {defn.vcpus} vcpus")
    max_vcpus = defn.max_vcpus or defn.vcpus
    if max_vcpus < defn.vcpus:
        raise InvalidVmConfig(f"max vcpus {max_vcpus} below vcpus {defn.vcpus}")
    if not 0 <= hotplug_slots <= MAX_ROOT_PORTS:
        raise InvalidVmConfig(f"hotplug slots {hotplug_slots} not in 0..{MAX_ROOT_PORTS}")

    argv = [binary, "-machine", machine]
    for accel in accels:
        argv += ["-accel", accel]  # the first that works is used: kvm, else tcg
    if defn.cpu_model is not None:
        argv += ["-cpu", _cpu_model(defn.cpu_model)]
    argv += [
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-m", f"{defn.memory_mib}M",
        "-smp", f"{defn.vcpus},maxcpus={max_vcpus}",
        "-name", f"guest={escape_opt(defn.name)},debug-threads=on",
        "-uuid", vm_uuid,
        "-chardev", f"socket,id=qmp,path={escape_opt(qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(run_dir / PIDFILE),
        "-msg", "timestamp=on",
    ]
    if defn.launch_paused:
        argv.append("-S")

    _check_disks(defn.disks)
    virtio = [d for d in defn.disks if d.bus is DiskBus.VIRTIO]
    nic_ports = len(defn.nics)  # the first root ports: see nic_port
    ports = nic_ports + len(virtio) + hotplug_slots
    if ports > MAX_ROOT_PORTS:
        raise InvalidVmConfig(f"{nic_ports} NICs, {len(virtio)} virtio disks and "
                              f"{hotplug_slots} hot plug slots need {ports} root ports; "
                              f"at most {MAX_ROOT_PORTS}")
    devices: list[dict[str, Any]] = [
        {"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER, "bus": "pcie.0"}]
    devices += [{"driver": "pcie-root-port", "id": root_port_id(n), "bus": "pcie.0",
                 "chassis": n} for n in range(1, ports + 1)]
    for dev in devices:
        argv += ["-device", _json(dev)]
    # Virtio disks take the root ports after the NICs' in their order; the rest stay
    # free for hot plug.
    port_of = {d.name: root_port_id(n)
               for n, d in enumerate(virtio, start=nic_ports + 1)}
    for disk in defn.disks:
        for node in disk_blockdevs(disk, block=is_block_device(disk.path or "")):
            argv += ["-blockdev", _json(node)]
        argv += ["-device", _json(disk_device(disk, port=port_of.get(disk.name)))]
    return argv


# --- NICs, RNG, balloon, watchdog, console ---------------------------------------------

# The qemu device of each NIC model. e1000 stays the 82540EM the guest was installed
# with (q35 takes it on a root port as well), rather than becoming e1000e.
NIC_DRIVERS = {NicModel.VIRTIO: "virtio-net-pci", NicModel.E1000: "e1000",
               NicModel.E1000E: "e1000e", NicModel.RTL8139: "rtl8139"}
RNG_FILES = {RngSource.URANDOM: "/dev/urandom", RngSource.RANDOM: "/dev/random",
             RngSource.HWRNG: "/dev/hwrng"}
# qemu has no "dump" (libvirt dumps the guest's core from a pause itself).
_WATCHDOG_ACTIONS = {a: a.value for a in WatchdogAction} | {WatchdogAction.DUMP: "pause"}
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# [virt] nic_backend: "", "user", "bridge" or "bridge:<name>" (a Linux interface name).
NIC_BACKEND = re.compile(r"|user|bridge(:[A-Za-z0-9_.-]{1,15})?")


def nic_id(nic: NicSpec) -> str:
    """The NIC's qemu device id (also its QMP net client name): net0, net1, ..."""
    return f"net{nic.order}"


def nic_port(nic: NicSpec) -> str:
    """The NIC's root port: NICs take the first ones, in their order (rp1 = net0), so
    a disk plugged or unplugged later never moves a NIC in the guest."""
    return root_port_id(nic.order + 1)


def nic_netdev(nic: NicSpec, nic_backend: str) -> dict[str, Any] | None:
    """The ``-netdev`` a NIC attaches to, per ``[virt] nic_backend``, or None.

    - "" (default): none. The NIC is in the guest with its MAC and model, link up,
      but its frames go nowhere (qemu warns "nic netN has no peer" and runs).
    - "user": qemu's user-mode (slirp) network, private to this NIC: outbound
      connections only, through the host's stack; nothing reaches the guest.
    - "bridge": a tap on the Linux bridge named as the NIC's network (VDSM's
      bridge for network X is X), made by qemu-bridge-helper.
    - "bridge:<name>": every NIC on bridge <name>, also through qemu-bridge-helper
      (it must be installed setuid and <name> allowed in /etc/qemu/bridge.conf).
    """
    if not NIC_BACKEND.fullmatch(nic_backend):
        raise InvalidVmConfig(f"nic backend {nic_backend!r}: expected \"\", user, bridge "
                              f"or bridge:<name>")
    netdev_id = f"hostnet{nic.order}"
    if nic_backend == "":
        return None
    if nic_backend == "user":
        return {"type": "user", "id": netdev_id}
    bridge = nic_backend.partition(":")[2] or nic.network
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
        raise InvalidVmConfig(f"NIC {nic.mac}: network {nic.network!r} is not a bridge "
                              f"name (nic_backend = bridge)")
    return {"type": "bridge", "id": netdev_id, "br": bridge}


def nic_device(nic: NicSpec, nic_backend: str) -> dict[str, Any]:
    if not _MAC.fullmatch(nic.mac) or int(nic.mac[:2], 16) & 1:
        raise InvalidVmConfig(f"NIC {nic.order}: bad MAC address {nic.mac!r}")
    dev: dict[str, Any] = {"driver": NIC_DRIVERS[nic.model], "id": nic_id(nic),
                           "bus": nic_port(nic), "addr": "0x0", "mac": nic.mac}
    netdev = nic_netdev(nic, nic_backend)
    if netdev is not None:
        dev["netdev"] = netdev["id"]
    if nic.boot_order is not None:
        dev["bootindex"] = nic.boot_order
    return dev


def other_devices(defn: VmDefinition, *, run_dir: Path, nic_backend: str = "",
                  binary: str = QEMU_BINARY) -> list[str]:
    """The argv of the VM's NICs, RNG, balloon, watchdog and console.

    NICs sit on root ports (see `nic_port`); the others are integrated endpoints on
    pcie.0, which has room for them next to `MAX_ROOT_PORTS` ports and the SCSI
    controller (30 usable slots). Blocking (checks /dev/hwrng, asks qemu once)."""
    argv: list[str] = []
    orders = [nic.order for nic in defn.nics]
    if orders != list(range(len(defn.nics))):
        raise InvalidVmConfig(f"NIC orders {orders}: expected 0..{len(defn.nics) - 1}")
    for nic in defn.nics:
        netdev = nic_netdev(nic, nic_backend)
        if netdev is not None:
            argv += ["-netdev", _json(netdev)]
        argv += ["-device", _json(nic_device(nic, nic_backend))]
    if defn.rng is not None:
        path = RNG_FILES[defn.rng.source]
        if defn.rng.source is RngSource.HWRNG and not os.path.exists(path):
            raise InvalidVmConfig(f"rng source hwrng: this host has no {path}")
        argv += ["-object", _json({"qom-type": "rng-random", "id": "rng0-backend",
                                   "filename": path})]
        rng: dict[str, Any] = {"driver": "virtio-rng-pci", "id": "rng0", "bus": "pcie.0",
                               "rng": "rng0-backend"}
        if defn.rng.max_bytes is not None:
            rng["max-bytes"] = defn.rng.max_bytes
            rng["period"] = defn.rng.period_ms or 1000  # libvirt's default period
        argv += ["-device", _json(rng)]
    if defn.balloon is not None:
        argv += ["-device", _json({"driver": "virtio-balloon-pci", "id": "balloon0",
                                   "bus": "pcie.0"})]
    if defn.watchdog is not None:
        if defn.watchdog.model != "i6300esb":
            raise InvalidVmConfig(f"watchdog model {defn.watchdog.model!r}: i6300esb only")
        argv += ["-device", _json({"driver": "i6300esb", "id": "watchdog0",
                                   "bus": "pcie.0"})]
        action = _WATCHDOG_ACTIONS[defn.watchdog.action]
        argv += (["-action", f"watchdog={action}"] if has_action_option(binary)
                 else ["-watchdog-action", action])  # qemu before 6.0
    if defn.console is not None:
        sock = str(Path(run_dir) / CONSOLE_SOCKET)
        if len(sock.encode()) > _SUN_PATH_MAX:
            raise InvalidVmConfig(f"run dir too long for a unix socket: {run_dir}")
        argv += ["-chardev", f"socket,id=charconsole0,path={escape_opt(sock)},server=on,"
                             f"wait=off"]
        if defn.console.target is ConsoleTarget.VIRTIO:
            argv += ["-device", _json({"driver": "virtio-serial-pci", "id": "virtio-serial0",
                                       "bus": "pcie.0"}),
                     "-device", _json({"driver": "virtconsole", "id": "console0",
                                       "chardev": "charconsole0",
                                       "bus": "virtio-serial0.0"})]
        else:
            argv += ["-device", _json({"driver": "isa-serial", "id": "console0",
                                       "chardev": "charconsole0"})]
    return argv


@functools.cache
def has_action_option(binary: str = QEMU_BINARY) -> bool:
    """Whether this qemu has ``-action`` (6.0 and later; ``-watchdog-action`` before).
    Blocking, asked once."""
    try:
        out = subprocess.run([binary, "-action", "help"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot ask qemu for -action: %s", e)
        return True
    return "watchdog=" in out


@functools.cache
def supported_machines(binary: str = QEMU_BINARY) -> frozenset[str]:
    """The machine types this qemu offers (``-machine help``; blocking, asked once)."""
    try:
        out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot list qemu machine types: %s", e)
        return frozenset({"q35"})
    return frozenset(line.split()[0] for line in out.splitlines()[1:] if line.strip())


def resolve_machine(requested: str | None, binary: str = QEMU_BINARY) -> tuple[str, str | None]:
    """The q35 machine type to run for `requested`, and a note when it differs.

    Engines name their hosts' machine types (RHEL's ``pc-q35-rhel8.6.0``, old
    ``pc-i440fx-rhel7.3.0``); this agent's devices (PCIe root ports, AHCI) are
    q35's, so anything this qemu lacks, or not a q35 type, runs as plain ``q35``.
    Blocking (asks qemu once)."""
    if requested is None:
        return "q35", None
    if _MACHINE.fullmatch(requested) and requested in supported_machines(binary):
        return requested, None
    return "q35", f"machine {requested} (runs as q35)"


@functools.cache
def supported_cpu_models(binary: str = QEMU_BINARY) -> frozenset[str]:
    """The CPU models this qemu offers (``-cpu help``; blocking, asked once)."""
    try:
        out = subprocess.run([binary, "-cpu", "help"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot list qemu CPU models: %s", e)
        return frozenset()
    # "x86 Broadwell-noTSX  (alias of Broadwell-v2)": the second word.
    return frozenset(words[1] for words in (line.split() for line in out.splitlines())
                     if len(words) >= 2 and words[0] == "x86")


def resolve_cpu_model(requested: str | None,
                      binary: str = QEMU_BINARY) -> tuple[str | None, str | None]:
    """The CPU model to run for `requested`, and a note when it differs.

    Definitions carry the engine host's model names; a name this qemu lacks runs as
    its nearest relative: trailing variants are dropped one by one
    ("Skylake-Server-noTSX-IBRS" -> "Skylake-Server-noTSX" -> "Skylake-Server"), and
    a model with no relative here runs as qemu's default CPU. Blocking (asks qemu
    once); an empty model list (qemu did not answer) leaves the name alone."""
    if requested is None or requested == "host":
        return requested, None
    known = supported_cpu_models(binary)
    if not known or requested in known:
        return requested, None
    candidate = requested
    while "-" in candidate:
        candidate = candidate.rsplit("-", 1)[0]
        if candidate in known:
            return candidate, f"cpu model {requested} (runs as {candidate})"
    return None, f"cpu model {requested} (unknown to this qemu; runs as its default)"


def _check_disks(disks: Sequence[DiskSpec]) -> None:
    names: set[str] = set()
    slots: set[tuple[DiskBus, int]] = set()
    boot: set[int] = set()
    for disk in disks:
        check_disk(disk)
        if disk.name in names:
            raise InvalidVmConfig(f"disk {disk.name} given twice")
        names.add(disk.name)
        if disk.bus is not DiskBus.VIRTIO:
            if (disk.bus, disk.index) in slots:
                raise InvalidVmConfig(f"disk {disk.name}: {disk.bus} index {disk.index} "
                                      "used twice")
            slots.add((disk.bus, disk.index))
        if disk.boot_order is not None:
            if disk.boot_order in boot:
                raise InvalidVmConfig(f"disk {disk.name}: boot order {disk.boot_order} "
                                      "used twice")
            boot.add(disk.boot_order)


def _canonical_uuid(vm_id: str) -> str:
    try:
        return str(uuid.UUID(vm_id))
    except (ValueError, TypeError, AttributeError):
        raise InvalidVmConfig(f"vm id {vm_id!r} is not a UUID") from None


def _cpu_model(value: str) -> str:
    # -cpu is "model,feature,feature=value": its commas are syntax, so each part is
    # checked instead of escaped.
    model, *features = value.split(",")
    if not _CPU_MODEL.fullmatch(model) or not all(_CPU_FEATURE.fullmatch(f) for f in features):
        raise InvalidVmConfig(f"cpu model {value!r}")
    return value


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


# --- the process --------------------------------------------------------------------


@dataclass(frozen=True)
class QemuExit:
    """How a qemu process ended, as far as we can know."""

    pid: int
    # The wait status as subprocess reports it (negative: killed by that signal), or
    # None when qemu was not our child (adopted after an agent restart).
    returncode: int | None
    log_tail: str  # the end of qemu.log: qemu writes its reasons to stderr

    def describe(self) -> str:
        if self.returncode is None:
            how = "exited (status unknown: not our child)"
        elif self.returncode < 0:
            how = f"was killed by signal {-self.returncode}"
        else:
            how = f"exited with status {self.returncode}"
        tail = self.log_tail.strip()
        return f"qemu (pid {self.pid}) {how}" + (f": {tail}" if tail else "")


def run_paths(run_dir: Path) -> tuple[Path, Path, Path]:
    """(qmp socket, pidfile, log) of a run dir."""
    return run_dir / QMP_SOCKET, run_dir / PIDFILE, run_dir / LOGFILE


def read_log_tail(run_dir: Path, size: int = _LOG_TAIL) -> str:
    """Blocking: the end of a run dir's qemu.log ("" when there is none)."""
    try:
        with open(run_dir / LOGFILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# Popen objects of children we stopped watching (`QemuProcess.close`) while they ran:
# dropping them would make subprocess reap the qemu behind our back (its `_active`
# list) and warn; holding them keeps the process ours to find again.
_detached: list[subprocess.Popen[bytes]] = []


class QemuProcess:
    """One qemu process of one VM: started by us (`start`) or found again (`find`)."""

    def __init__(self, *, vm_id: str, run_dir: Path, pid: int, pidfd: int,
                 popen: subprocess.Popen[bytes] | None,
                 run_blocking: RunBlocking | None = None) -> None:
        """Use `start` or `find`; this takes ownership of `pidfd`."""
        self.vm_id = vm_id
        self.run_dir = Path(run_dir)
        self.pid = pid
        self.qmp_socket, self.pidfile, self.log_path = run_paths(self.run_dir)
        self._pidfd: int | None = pidfd
        self._popen = popen
        self._run = run_blocking or _to_thread
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[QemuExit] = self._loop.create_future()
        self._reaping: asyncio.Task[None] | None = None
        # The pidfd turns readable once the process has exited (zombie or reaped).
        self._loop.add_reader(pidfd, self._on_pidfd)

    @property
    def is_child(self) -> bool:
        """Started by this object (we get its exit status), not adopted."""
        return self._popen is not None

    @property
    def exited(self) -> bool:
        return self._exit.done()

    # --- start / find ---

    @classmethod
    async def start(cls, argv: Sequence[str], *, vm_id: str, run_dir: Path,
                    timeout: float = 30.0,
                    run_blocking: RunBlocking | None = None) -> QemuProcess:
        """Start qemu and return once its QMP socket exists.

        qemu runs in its own session, so it outlives the agent (and its process
        group's signals). Raises `errors.CannotCreateVM` when a qemu of this VM already
        runs from `run_dir`, or when qemu exits (its log tail) or is not listening in
        `timeout`. The socket existing does not mean qemu finished starting: it can
        still exit before answering QMP (`vdsmlite.virt.qmp.open_session` handles it).
        """
        run = run_blocking or _to_thread
        run_dir = Path(run_dir)
        existing = await cls.find(vm_id, run_dir, run_blocking=run)
        if existing is not None:
            existing.close()
            raise errors.CannotCreateVM(f"qemu of VM {vm_id} already runs (pid {existing.pid})")
        argv = in_own_scope(list(argv), _canonical_uuid(vm_id))
        popen, pidfd = await run(_spawn, argv, run_dir)
        proc = cls(vm_id=vm_id, run_dir=run_dir, pid=popen.pid, pidfd=pidfd, popen=popen,
                   run_blocking=run)
        log.info("started qemu for VM %s: pid %d", vm_id, popen.pid)
        deadline = time.monotonic() + timeout
        try:
            # A stat in the run dir (tmpfs or local disk) right on the loop: a thread
            # hop per poll would queue behind every other VM's work in a burst.
            while not proc.qmp_socket.exists():
                if proc.exited:
                    raise errors.CannotCreateVM((await proc.wait()).describe())
                if time.monotonic() > deadline:
                    ended = await proc.kill()
                    raise errors.CannotCreateVM(f"qemu not listening on QMP after "
                                                f"{timeout}s; {ended.describe()}")
                # Poll the socket, but wake at once if qemu exits.
                await asyncio.wait([proc._exit], timeout=0.005)
        except asyncio.CancelledError:
            # Nobody will drive a qemu whose start was abandoned: no orphan VM.
            proc._signal(signal.SIGKILL)
            proc.close()
            raise
        return proc

    @classmethod
    async def find(cls, vm_id: str, run_dir: Path, *,
                   run_blocking: RunBlocking | None = None) -> QemuProcess | None:
        """The qemu of VM `vm_id` running from `run_dir` (after an agent restart), or None.

        The pidfile names a pid; it is ours only if ``/proc/<pid>/cmdline`` is a
        qemu with this VM's uuid and this run dir's pidfile. The pidfd is opened
        before that check, and the process checked alive after it: the pid cannot
        be reused between the two while the pidfd's process lives."""
        run = run_blocking or _to_thread
        found = await run(_adopt, _canonical_uuid(vm_id), Path(run_dir))
        if found is None:
            return None
        pid, pidfd = found
        log.info("found qemu of VM %s running: pid %d", vm_id, pid)
        return cls(vm_id=vm_id, run_dir=Path(run_dir), pid=pid, pidfd=pidfd, popen=None,
                   run_blocking=run)

    # --- death ---

    def _on_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        if self._reaping is None:
            self._reaping = background.spawn(self._reap())

    async def _reap(self) -> None:
        returncode: int | None = None
        if self._popen is not None:
            # Our child: reap it (no zombie) and keep its status. Non-blocking: it exited.
            returncode = self._popen.poll()
            if returncode is None:  # not expected once the pidfd said so; never block here
                returncode = await self._run(self._popen.wait)
        tail = await self._run(read_log_tail, self.run_dir)
        ended = QemuExit(pid=self.pid, returncode=returncode, log_tail=tail)
        log.info("VM %s: %s", self.vm_id, ended.describe())
        self._close_pidfd()
        if not self._exit.done():
            self._exit.set_result(ended)

    async def wait(self) -> QemuExit:
        """Until qemu has exited; how it ended."""
        if self._pidfd is None and not self._exit.done() and self._reaping is None:
            raise RuntimeError(f"qemu {self.pid} is no longer watched (closed)")
        return await asyncio.shield(self._exit)

    async def kill(self, grace: float = 5.0) -> QemuExit:
        """SIGTERM (qemu shuts down cleanly), SIGKILL after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            if self.exited:
                break
            self._signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), wait)
        return await self.wait()

    def _signal(self, sig: int) -> None:
        # Through the pidfd: the signal reaches this process even if its pid was reused.
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def close(self) -> None:
        """Stop watching without touching qemu (agent shutdown): it keeps running and
        `find` finds it again."""
        if self._popen is not None and self._popen.returncode is None:
            _detached.append(self._popen)
        if self._reaping is None:
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def _to_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


SYSTEMD_RUNNING = Path("/run/systemd/system")


def in_own_scope(argv: list[str], vm_uuid: str) -> list[str]:
    """`argv` run in a transient systemd scope of its own, where systemd runs.

    Under systemd the agent's service cgroup would take qemu down with it
    (``systemctl stop``/restart kills the whole cgroup); a scope in
    ``machine.slice`` is where libvirt puts VMs too. ``systemd-run --scope``
    execs the command itself, so the pid we watch is qemu's. Without systemd
    (containers, test machines) the new session alone keeps qemu alive.
    """
    if not SYSTEMD_RUNNING.is_dir() or shutil.which("systemd-run") is None:
        return argv
    return ["systemd-run", "--scope", "--quiet", "--collect", "--slice=machine.slice",
            f"--unit=vdsmlite-vm-{vm_uuid}", "--", *argv]


def _spawn(argv: list[str], run_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Blocking: start qemu; stale socket and pidfile from a previous run go first."""
    qmp, pidfile, logfile = run_paths(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (qmp, pidfile):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    with open(logfile, "wb") as err:
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, close_fds=True, start_new_session=True,
                                     cwd="/")
        except OSError as e:
            raise errors.CannotCreateVM(f"cannot run {argv[0]}: {e}") from e
    # Not reaped yet (only our poll() does that), so the pid is still this process.
    return popen, os.pidfd_open(popen.pid)


def _adopt(vm_uuid: str, run_dir: Path) -> tuple[int, int] | None:
    """Blocking: (pid, pidfd) of our live qemu named by the run dir's pidfile, or None."""
    _, pidfile, _ = run_paths(run_dir)
    try:
        pid = int(pidfile.read_text().strip())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ours = (os.path.basename(argv[0]).startswith(b"qemu-system")
                and _arg_after(argv, b"-uuid") == vm_uuid.encode()
                and _arg_after(argv, b"-pidfile") == bytes(pidfile))
        # A zombie has an empty cmdline; and a readable pidfd means it has exited.
        if ours and not _pidfd_readable(pidfd):
            return pid, pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


def _arg_after(argv: list[bytes], flag: bytes) -> bytes | None:
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def _pidfd_readable(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])
