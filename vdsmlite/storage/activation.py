"""Making LVs usable as block devices: one small interface, two strategies.

* `DeviceMapperActivation` - where ``/dev/mapper/control`` exists: ``lvchange
  -ay``, the LV is ``/dev/<vg>/<lv>``.
* `LoopActivation` - where it does not (containers, these build machines):
  the same LVM metadata is honoured by mapping the LV's extents with a loop
  device at ``pe_start + first_pe * extent_size`` on its PV, sized to the LV.
  Only a single linear segment can be mapped this way; anything else is a
  clear error, never a wrong mapping.

Above the strategies, `Activator` reference-counts activations (Image.prepare
twice needs teardown twice) and keeps a stable link per LV under
``<run_dir>/lv/<vg>/<lv>``, so the rest of the code never cares which
strategy is in use. Before an LV is removed it must be released to zero and
unmapped (`Activator.unmap`), so no loop device can keep pointing at extents
that are about to be reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from vdsmlite import errors
from vdsmlite.storage import commands, lvm

log = logging.getLogger("vdsmlite.storage.activation")

# How long activation waits for a loop being detached to go (its holder closing it).
DYING_TIMEOUT = 10.0

# linux/loop.h
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")


class Strategy(Protocol):
    name: str

    def activate(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                 devices: Sequence[str]) -> str: ...

    def deactivate(self, vg_name: str, lv_name: str, devices: Sequence[str]) -> None: ...

    def refresh(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                devices: Sequence[str]) -> None: ...


class DeviceMapperActivation:
    name = "device-mapper"

    def activate(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                 devices: Sequence[str]) -> str:
        lvm.lv_activate(lv.vg_name, lv.name, devices, True)
        return f"/dev/{lv.vg_name}/{lv.name}"

    def deactivate(self, vg_name: str, lv_name: str, devices: Sequence[str]) -> None:
        lvm.lv_activate(vg_name, lv_name, devices, False)

    def refresh(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                devices: Sequence[str]) -> None:
        lvm.run("lvchange", devices, "--refresh", f"{lv.vg_name}/{lv.name}")


def _loop_attr(loop: str, name: str) -> str | None:
    try:
        return Path(f"/sys/block/{loop}/loop/{name}").read_text().strip()
    except OSError:
        return None


def _loop_maps(loop: str, backing: str, offset: int) -> bool:
    """Whether loop device `loop` (a name: loop7) maps `backing` at `offset`."""
    return (_loop_attr(loop, "backing_file") == backing and
            _loop_attr(loop, "offset") == str(offset))


def _sector_size(device: str) -> int:
    name = os.path.basename(os.path.realpath(device))
    try:
        return int(Path(f"/sys/class/block/{name}/queue/logical_block_size").read_text())
    except (OSError, ValueError):
        return 512


class LoopActivation:
    name = "loop"

    def _extent(self, lv: lvm.LV, pe_starts: dict[str, int],
                extent_size: int) -> tuple[str, int, int]:
        if len(lv.segments) != 1:
            raise errors.CannotActivateLogicalVolume(
                f"{lv.vg_name}/{lv.name}",
                f"{len(lv.segments)} segments: only single-segment LVs can be mapped "
                "without device-mapper")
        seg = lv.segments[0]
        if seg.pv not in pe_starts:
            raise errors.CannotActivateLogicalVolume(f"{lv.vg_name}/{lv.name}",
                                                     f"unknown PV {seg.pv}")
        offset = pe_starts[seg.pv] + seg.first_pe * extent_size
        length = (seg.last_pe - seg.first_pe + 1) * extent_size
        if length != lv.size:
            raise errors.CannotActivateLogicalVolume(
                f"{lv.vg_name}/{lv.name}", f"segment size {length} != LV size {lv.size}")
        return seg.pv, offset, length

    def find(self, pv: str, offset: int, size: int | None = None, *,
             dying: bool = True) -> str | None:
        """The loop device already mapping (pv, offset[, size]), if any; with
        ``dying=False`` not one being detached (see `activate`)."""
        real = os.path.realpath(pv)
        for entry in Path("/sys/block").glob("loop*"):
            loop = entry.name
            if _loop_attr(loop, "backing_file") != real:
                continue
            if _loop_attr(loop, "offset") != str(offset):
                continue
            if size is not None and _loop_attr(loop, "sizelimit") != str(size):
                continue
            if not dying and _loop_attr(loop, "autoclear") == "1":
                continue
            return f"/dev/{loop}"
        return None

    def activate(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                 devices: Sequence[str]) -> str:
        pv, offset, size = self._extent(lv, pe_starts, extent_size)
        # A loop detached while someone still had it open (sanlock on a stopped agent's
        # ids and leases) has autoclear set: it unbinds when its last user closes it,
        # and reads 0 bytes from then on. Reusing it made a restarted agent's join read
        # nothing forever. Wait a moment for it to go, then map the LV afresh.
        self._wait_dying(pv, offset)
        existing = self.find(pv, offset, dying=False)
        if existing is not None:
            if _loop_attr(os.path.basename(existing), "sizelimit") != str(size):
                self._set_sizelimit(existing, size)
            return existing
        try:
            # Direct I/O: dm-linear caches nothing, and neither may its stand-in, or
            # this host could read its own stale copy of what another host wrote.
            out = commands.run(["losetup", "--find", "--show", "--direct-io=on",
                                "--offset", str(offset), "--sizelimit", str(size),
                                "--sector-size", str(_sector_size(pv)), pv], timeout=60)
        except commands.CommandError as e:
            raise errors.CannotActivateLogicalVolume(f"{lv.vg_name}/{lv.name}", e.err.strip()) \
                from e
        return out.out.strip()

    def _wait_dying(self, pv: str, offset: int, timeout: float = DYING_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.find(pv, offset, dying=False) is not None:
                return  # a live mapping: reused
            dying = self.find(pv, offset)
            if dying is None:
                return
            if time.monotonic() > deadline:
                # Still held: a second loop over the same extent is safe (both use
                # direct I/O, neither caches), the dying one serves its holder till then.
                log.warning("loop %s over %s@%d is still being detached after %.0fs; "
                            "mapping the extent on a new loop", dying, pv, offset, timeout)
                return
            time.sleep(0.05)

    def deactivate(self, vg_name: str, lv_name: str, devices: Sequence[str]) -> None:
        raise NotImplementedError("loop mappings are removed by path (Activator.unmap)")

    def detach(self, loop: str) -> None:
        try:
            commands.run(["losetup", "--detach", loop], timeout=60)
        except commands.CommandError as e:
            raise errors.CannotDeactivateLogicalVolume(loop, e.err.strip()) from e

    def refresh(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                devices: Sequence[str]) -> None:
        pv, offset, size = self._extent(lv, pe_starts, extent_size)
        loop = self.find(pv, offset)
        if loop is not None:
            self._set_sizelimit(loop, size)

    @staticmethod
    def _set_sizelimit(loop: str, size: int) -> None:
        """Grow a live mapping in place (the LV was extended contiguously)."""
        fd = os.open(loop, os.O_RDONLY)
        try:
            buf = bytearray(_LOOP_INFO64.size)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
            fields = list(_LOOP_INFO64.unpack(buf))
            fields[4] = size  # lo_sizelimit
            fcntl.ioctl(fd, LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
            fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
        finally:
            os.close(fd)


def default_strategy() -> Strategy:
    return DeviceMapperActivation() if lvm.device_mapper_available() else LoopActivation()


class Activator:
    """Reference-counted activation with stable links (blocking; thread-safe)."""

    def __init__(self, link_root: Path, strategy: Strategy | None = None) -> None:
        self.link_root = link_root
        self.strategy = strategy or default_strategy()
        self._refs: dict[tuple[str, str], int] = {}
        # Loop strategy: (backing PV, offset) each activated LV was mapped at.
        self._mapped: dict[tuple[str, str], tuple[str, int]] = {}
        self._lock = threading.Lock()

    def link(self, vg_name: str, lv_name: str) -> Path:
        return self.link_root / vg_name / lv_name

    def refs(self, vg_name: str, lv_name: str) -> int:
        with self._lock:
            return self._refs.get((vg_name, lv_name), 0)

    def acquire(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                devices: Sequence[str]) -> Path:
        """Activate (first user) and return the LV's stable link path."""
        key = (lv.vg_name, lv.name)
        with self._lock:
            device = self.strategy.activate(lv, pe_starts, extent_size, devices)
            if isinstance(self.strategy, LoopActivation):
                pv, offset, _ = self.strategy._extent(lv, pe_starts, extent_size)
                self._mapped[key] = (os.path.realpath(pv), offset)
            link = self.link(*key)
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{lv.name}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(device)
            os.replace(tmp, link)
            self._refs[key] = self._refs.get(key, 0) + 1
            return link

    def release(self, vg_name: str, lv_name: str, devices: Sequence[str]) -> None:
        """Drop one reference; the last one deactivates."""
        key = (vg_name, lv_name)
        with self._lock:
            count = self._refs.get(key, 0) - 1
            if count > 0:
                self._refs[key] = count
                return
            self._refs.pop(key, None)
            self._deactivate(vg_name, lv_name, devices)

    def unmap(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
              devices: Sequence[str]) -> None:
        """Deactivate an LV about to be removed, refusing while anyone prepared it.

        Under the loop strategy every mapping of the LV's extents is found and
        detached, including ones left by a daemon that crashed (whose links and
        reference counts are gone): a stale loop device over extents LVM is about
        to hand to another LV would expose and corrupt that LV's data.
        """
        key = (lv.vg_name, lv.name)
        with self._lock:
            if self._refs.get(key, 0) > 0:
                raise errors.VolumeIsBusy(f"{lv.vg_name}/{lv.name}",
                                          f"{self._refs[key]} users still prepared it")
            self._deactivate(lv.vg_name, lv.name, devices)
            if isinstance(self.strategy, LoopActivation) and len(lv.segments) == 1:
                seg = lv.segments[0]
                if seg.pv in pe_starts:
                    offset = pe_starts[seg.pv] + seg.first_pe * extent_size
                    detached: set[str] = set()
                    while (stale := self.strategy.find(seg.pv, offset)) is not None:
                        if stale in detached:
                            # Detaching an open loop device only marks it to go away
                            # on last close: someone (sanlock?) still has it open.
                            raise errors.VolumeIsBusy(f"{lv.vg_name}/{lv.name}",
                                                      f"{stale} is still open")
                        self.strategy.detach(stale)
                        detached.add(stale)

    def _deactivate(self, vg_name: str, lv_name: str, devices: Sequence[str]) -> None:
        link = self.link(vg_name, lv_name)
        target = os.readlink(link) if link.is_symlink() else None
        mapped = self._mapped.pop((vg_name, lv_name), None)
        if isinstance(self.strategy, LoopActivation):
            # Only the loop device this LV was mapped to, and only while it still maps
            # it: a link left by a crashed daemon may name a loop number that has
            # since been freed and handed to someone else's device.
            if target and mapped is not None and \
                    _loop_maps(os.path.basename(target), *mapped):
                self.strategy.detach(target)
        else:
            self.strategy.deactivate(vg_name, lv_name, devices)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()

    def refresh(self, lv: lvm.LV, pe_starts: dict[str, int], extent_size: int,
                devices: Sequence[str]) -> None:
        if self.refs(lv.vg_name, lv.name) > 0 or self.link(lv.vg_name, lv.name).is_symlink():
            self.strategy.refresh(lv, pe_starts, extent_size, devices)
