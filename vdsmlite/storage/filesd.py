"""File storage domains: NFS, posixfs, gluster and local directories.

Layout (VDSM's)::

    <mount>/<sdUUID>/dom_md/{metadata,ids,leases,inbox,outbox,xleases}
    <mount>/<sdUUID>/images/<imgUUID>/<volUUID>{,.meta,.lease}

Domain metadata is written atomically (``metadata.new``, fsync, rename, fsync
the directory) and read with O_DIRECT. A domain is built in a hidden
``.<sdUUID>.creating`` directory and renamed into place as the last step, so a
crash never leaves a half-made domain that looks real.

Volume create order: data file (exclusive create), ``.meta`` with
LEGALITY=ILLEGAL, lease, then ``.meta`` LEGAL. A crash at any point leaves
either a data file without ``.meta`` or an ILLEGAL ``.meta``: both are listed
and reported ILLEGAL, and delete removes them. Local domains use no sanlock
leases (VDSM's LocalLock), so they have no ``.lease`` files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from vdsmlite import cancel, errors, failpoints
from vdsmlite.fsutil import fsync_dir
from vdsmlite.ids import parse_uuid
from vdsmlite.storage import clusterlock, directio, persistent, qemuimg, xleases
from vdsmlite.storage import constants as sc
from vdsmlite.storage.image import Image
from vdsmlite.storage.sd import (
    K_REMOTE_PATH,
    CreateVolumeRequest,
    Domain,
    Progress,
    VolumeState,
    initial_metadata,
)
from vdsmlite.storage.volmeta import VolumeMetadata

log = logging.getLogger("vdsmlite.storage.filesd")

MD_READ_LIMIT = 64 * sc.KiB


def _write_atomic(path: Path, data: bytes, mode: int = sc.FILE_VOLUME_PERMISSIONS) -> None:
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def detect_block_size(directory: Path) -> int:
    """512 if the filesystem takes 512-byte direct I/O, else 4096."""
    probe = directory / f".block-size-probe-{os.getpid()}"
    try:
        for size in (512, 4096):
            try:
                directio.write(probe, 0, b"\0" * size, size, create=True)
                return size
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return 4096
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


class FileDomain(Domain):
    def __init__(self, sd_uuid: str, mount_root: Path, *, io_timeout: int = 10) -> None:
        super().__init__(sd_uuid)
        self.mount_root = mount_root
        self.io_timeout = io_timeout

    @property
    def path(self) -> Path:
        return self.mount_root / self.uuid

    @property
    def md_path(self) -> Path:
        return self.path / sc.DOMAIN_META_DATA / sc.METADATA

    def is_local(self) -> bool:
        """A LOCALFS domain (no sanlock); reads the metadata."""
        return self.read_storage_type() == sc.StorageType.LOCALFS

    def exists(self) -> bool:
        return self.md_path.exists()

    def lockspace(self) -> tuple[str, str, int] | None:
        if self.is_local():
            return None  # VDSM's LocalLock: one host, no sanlock
        return self.uuid, str(self.path / sc.DOMAIN_META_DATA / sc.IDS), 0

    def leases_path(self) -> str:
        return str(self.path / sc.DOMAIN_META_DATA / sc.LEASES)

    def xleases_path(self) -> str:
        return str(self.path / sc.DOMAIN_META_DATA / sc.XLEASES)

    def health_path(self) -> Path:
        return self.md_path

    # --- metadata -------------------------------------------------------------------

    def read_metadata(self) -> dict[str, str]:
        try:
            data = directio.read_file(self.md_path, MD_READ_LIMIT, block_size=4096)
        except FileNotFoundError as e:
            raise errors.StorageDomainDoesNotExist(self.uuid) from e
        except OSError as e:
            raise errors.StorageDomainAccessError(self.uuid, str(e)) from e
        return persistent.parse_lines(data)

    def write_metadata(self, md: dict[str, str]) -> None:
        with self.lock:
            _write_atomic(self.md_path, persistent.dump_lines(md))

    def _type_info(self, md: dict[str, str]) -> dict[str, Any]:
        return {"remotePath": md.get(K_REMOTE_PATH, "")}

    def stats(self) -> dict[str, Any]:
        st = os.statvfs(self.path)
        return {
            "disktotal": str(st.f_frsize * st.f_blocks),
            "diskfree": str(st.f_frsize * st.f_bavail),
            "mdasize": 0, "mdafree": 0, "mdavalid": True, "mdathreshold": True,
        }

    # --- volumes --------------------------------------------------------------------

    def _image_dir(self, img_uuid: str) -> Path:
        return self.images_dir() / img_uuid

    def image_ids(self) -> list[str]:
        try:
            names = os.listdir(self.images_dir())
        except FileNotFoundError:
            return []
        return sorted(n for n in names if parse_uuid(n) == n)

    def volume_ids(self, img_uuid: str) -> list[str]:
        try:
            names = os.listdir(self._image_dir(img_uuid))
        except FileNotFoundError:
            return []
        found = set()
        for name in names:
            stem = name.removesuffix(sc.META_EXT)
            if parse_uuid(stem) == stem:
                found.add(stem)  # data file, .meta file, or both
        return sorted(found)

    def _paths(self, img_uuid: str, vol_uuid: str) -> tuple[Path, Path, Path]:
        base = self._image_dir(img_uuid) / vol_uuid
        return base, base.with_name(vol_uuid + sc.META_EXT), \
            base.with_name(vol_uuid + sc.LEASE_EXT)

    def volume(self, img_uuid: str, vol_uuid: str) -> VolumeState:
        data, meta, lease = self._paths(img_uuid, vol_uuid)
        try:
            st = os.stat(data)
            apparent, true = st.st_size, st.st_blocks * 512
        except FileNotFoundError as e:
            apparent = true = 0
            if not meta.exists():
                raise errors.VolumeDoesNotExist(vol_uuid) from e
        md, problem, initializing = None, None, False
        try:
            md = VolumeMetadata.from_bytes(
                directio.read_file(meta, sc.METADATA_SIZE * 2, block_size=4096))
        except FileNotFoundError:
            # Data without .meta: a create that never reached its metadata step.
            problem, initializing = "no metadata: the volume was never completed", True
        except errors.VolumeMetadataReadError as e:
            problem = str(e)
        lease_info = (str(lease), 0) if lease.exists() else None
        return VolumeState(uuid=vol_uuid, image=img_uuid, md=md, apparent_size=apparent,
                           true_size=true, initializing=initializing, lease=lease_info,
                           problem=problem)

    def scan(self) -> dict[str, dict[str, VolumeState]]:
        """Every volume by image in one walk of the images directory: one listing per
        image, a stat per data file and a read per ``.meta``."""
        out: dict[str, dict[str, VolumeState]] = {}
        for img in self.image_ids():
            states: dict[str, VolumeState] = {}
            for vol in self.volume_ids(img):
                try:
                    states[vol] = self.volume(img, vol)
                except errors.VolumeDoesNotExist:
                    continue  # deleted while we looked
            for state in states.values():
                if state.md is not None and state.md.parent in states:
                    states[state.md.parent].children.append(state.uuid)
            out[img] = states
        return out

    def set_volume_metadata(self, img_uuid: str, vol_uuid: str, md: VolumeMetadata) -> None:
        _, meta, _ = self._paths(img_uuid, vol_uuid)
        _write_atomic(meta, md.to_bytes())

    def _undo_create(self, req: CreateVolumeRequest, made: list[str]) -> None:
        log.info("volume %s: create stopped, removing its files", req.vol_uuid)
        with self.lock:
            data, meta, lease = self._paths(req.img_uuid, req.vol_uuid)
            for path in (data, lease, meta):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            fsync_dir(data.parent)
            if "parent" in made:
                Image(self, req.img_uuid).relink_parent_after_delete(req.parent_vol)
            with contextlib.suppress(OSError):
                data.parent.rmdir()

    def _create_volume(self, req: CreateVolumeRequest, progress: Progress,
                       made: list[str]) -> None:
        with self.lock:
            parent = Image(self, req.img_uuid).validate_create(req)
            if req.prealloc == sc.Allocation.PREALLOCATED:
                free = os.statvfs(self.path)
                if req.capacity > free.f_frsize * free.f_bavail:
                    raise errors.NoSpaceLeftOnDomain(self.uuid)
            img_dir = self._image_dir(req.img_uuid)
            img_dir.mkdir(mode=0o755, exist_ok=True)
            data, _, lease = self._paths(req.img_uuid, req.vol_uuid)
            try:
                fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             sc.FILE_VOLUME_PERMISSIONS)
            except FileExistsError as e:
                raise errors.VolumeAlreadyExists(req.vol_uuid) from e
            os.close(fd)
            made.append("data")
        try:
            self._create_data(req, parent, data)
        except (qemuimg.QemuImgError, OSError) as e:
            with contextlib.suppress(FileNotFoundError):
                data.unlink()
            raise errors.VolumeCreationError(req.vol_uuid, str(e)) from e
        failpoints.hit("volume.create.after_data")
        progress(60)
        cancel.check()
        if parent is not None and parent.md is not None and parent.md.voltype == sc.LEAF:
            made.append("parent")
            self.update_volume(req.img_uuid, parent.uuid, voltype=sc.INTERNAL)
        md = self.new_metadata(req, req.capacity, sc.ILLEGAL)
        self.set_volume_metadata(req.img_uuid, req.vol_uuid, md)
        failpoints.hit("volume.create.after_metadata")
        progress(75)
        cancel.check()
        if not self.is_local():
            fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, sc.FILE_VOLUME_PERMISSIONS)
            os.close(fd)
            block_size, alignment = self.geometry()
            clusterlock.init_resource(self.uuid, req.vol_uuid, lease, 0, sector=block_size,
                                 align=alignment)
        failpoints.hit("volume.create.after_lease")
        progress(90)
        cancel.check()
        if req.legal:
            self.set_volume_metadata(req.img_uuid, req.vol_uuid, md.replace(legality=sc.LEGAL))

    def _create_data(self, req: CreateVolumeRequest, parent: VolumeState | None,
                     data: Path) -> None:
        path = str(data)
        if req.format == sc.VolumeFormat.RAW:
            alloc = req.capacity
            if req.initial_size is not None and req.prealloc == sc.Allocation.PREALLOCATED:
                alloc = max(req.initial_size, 4096)
            if req.prealloc == sc.Allocation.PREALLOCATED:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    # In steps, stoppable between them: on storage without fallocate
                    # (NFSv3) glibc writes every block, which takes long.
                    step = 1 << 30
                    for start in range(0, alloc, step):
                        cancel.check()
                        os.posix_fallocate(fd, start, min(step, alloc - start))
                        cancel.report_bytes(min(start + step, alloc))
                    os.ftruncate(fd, req.capacity)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                os.truncate(path, req.capacity)
        else:
            backing = None
            backing_fmt = None
            if parent is not None and parent.md is not None:
                backing = parent.uuid  # relative: resolved in the image directory
                backing_fmt = "qcow2" if parent.md.format == sc.VolumeFormat.COW else "raw"
            qemuimg.create(path, qemuimg.QCOW2, req.capacity, backing=backing,
                           backing_fmt=backing_fmt, cwd=str(data.parent))
        os.chmod(path, sc.FILE_VOLUME_PERMISSIONS)

    def delete_volume(self, img_uuid: str, vol_uuid: str, *, post_zero: bool, force: bool,
                      progress: Progress) -> None:
        with self.lock:
            state = Image(self, img_uuid).check_deletable(vol_uuid, force)
            data, meta, lease = self._paths(img_uuid, vol_uuid)
            if state.md is not None:
                # First mark it: a crash from here on leaves an ILLEGAL volume, not a
                # half-deleted one that looks fine.
                self.set_volume_metadata(img_uuid, vol_uuid,
                                         state.md.replace(legality=sc.ILLEGAL))
            if post_zero:
                # Deleting the file frees its blocks on file storage; VDSM does not
                # zero file volumes either.
                log.info("postZero ignored for file volume %s", vol_uuid)
            for path in (data, lease, meta):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            fsync_dir(data.parent)
            progress(90)
            if state.md is not None:
                Image(self, img_uuid).relink_parent_after_delete(state.md.parent)
            with contextlib.suppress(OSError):
                data.parent.rmdir()  # only when the image is now empty

    def _grow_volume(self, img_uuid: str, vol_uuid: str, md: VolumeMetadata,
                     new_size: int) -> int:
        data, _, _ = self._paths(img_uuid, vol_uuid)
        if md.format == sc.VolumeFormat.RAW:
            fd = os.open(data, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if md.type == sc.Allocation.PREALLOCATED:
                    os.posix_fallocate(fd, 0, new_size)
                os.ftruncate(fd, new_size)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            try:
                qemuimg.resize(str(data), qemuimg.QCOW2, new_size)
            except qemuimg.QemuImgError as e:
                raise errors.VolumeExtendingError(vol_uuid, str(e)) from e
        return new_size

    def prepare_volume(self, img_uuid: str, vol_uuid: str) -> Path:
        data, _, _ = self._paths(img_uuid, vol_uuid)
        if not data.exists():
            raise errors.VolumeDoesNotExist(vol_uuid)
        return data

    def teardown_volume(self, img_uuid: str, vol_uuid: str) -> None:
        return None  # files need no activation

    def format(self) -> None:
        path = self.path
        if path.is_symlink() or not path.is_dir():
            raise errors.StorageDomainLayoutError(self.uuid, f"{path} is not a domain directory")
        # Renamed first: a crash mid-removal leaves a hidden directory, never a broken domain.
        trash = path.with_name(f".{self.uuid}.removing")
        os.rename(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash)


def create_file_domain(
    mount_root: Path, *, sd_uuid: str, storage_type: sc.StorageType, name: str,
    domain_class: sc.DomainClass, block_size: int, alignment: int, remote_path: str,
    io_timeout: int,
) -> FileDomain:
    final = mount_root / sd_uuid
    if final.exists():
        raise errors.StorageDomainAlreadyExists(sd_uuid)
    work = mount_root / f".{sd_uuid}.creating"
    if work.exists():
        shutil.rmtree(work)  # left by a create that crashed
    local = storage_type == sc.StorageType.LOCALFS
    try:
        md_dir = work / sc.DOMAIN_META_DATA
        md_dir.mkdir(parents=True, mode=0o755)
        (work / sc.DOMAIN_IMAGES).mkdir(mode=0o755)
        # VDSM's fileSD._prepareMetadata makes every special volume of a V4+ domain
        # (sd.SPECIAL_VOLUMES_V4), localfs included: ids/leases/xleases empty, the
        # mailboxes 16 MiB (FILE_SPECIAL_VOLUME_SIZES_MIB).
        files = [sc.IDS, sc.LEASES, sc.XLEASES, sc.INBOX, sc.OUTBOX]
        for fname in files:
            fd = os.open(md_dir / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         sc.FILE_VOLUME_PERMISSIONS)
            if fname in (sc.INBOX, sc.OUTBOX):
                os.ftruncate(fd, sc.FILE_MAILBOX_SIZE)
            os.close(fd)
        if not local:
            # sanlock formats the lockspace and the SDM lease on the new files.
            clusterlock.init_lockspace(sd_uuid, md_dir / sc.IDS, sector=block_size, align=alignment,
                                  io_timeout=io_timeout)
            clusterlock.init_resource(sd_uuid, sc.SDM_LEASE_NAME, md_dir / sc.LEASES,
                                 sc.SDM_LEASE_SLOT * alignment, sector=block_size,
                                 align=alignment)
        # VDSM formats the external leases index at creation (format_external_leases);
        # the file starts empty and grows as leases are added.
        xleases.format_index(sd_uuid, str(md_dir / sc.XLEASES), alignment=alignment,
                             block_size=block_size)
        md = initial_metadata(sd_uuid=sd_uuid, storage_type=storage_type, name=name,
                              domain_class=domain_class, block_size=block_size,
                              alignment=alignment, extra={K_REMOTE_PATH: remote_path})
        _write_atomic(md_dir / sc.METADATA, persistent.dump_lines(md))
        fsync_dir(md_dir)
        fsync_dir(work)
        os.rename(work, final)
        fsync_dir(mount_root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FileDomain(sd_uuid, mount_root, io_timeout=io_timeout)
