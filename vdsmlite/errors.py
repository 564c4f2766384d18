"""The VDSM verb-error catalog: one class per VDSM code.

`VdsmError`s carry VDSM's numeric codes and message style, so an engine written
for VDSM maps them exactly as it maps VDSM's own.  VDSM renders an error as
``"<message>: <repr(value)>"`` where ``value`` is the tuple of constructor
arguments (``StorageDomainDoesNotExist(sd)`` ->
``"Storage domain does not exist: ('<sd>',)"``); subclasses that take named
fields render them as one ``"k=v, ..."`` string, as VDSM does.

Codes above 5000 belong to the engine; nothing here may use them.

Every class here is raised somewhere, or is *reserved*: named for a verb not built
yet (virt, SPM) and saying so in its docstring; tests/test_errors.py keeps it so.

The errors of the JSON-RPC protocol itself (-32700 ... -32603) live with the RPC
layer, in `vdsmlite.rpc.errors`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VdsmLiteError(Exception):
    """Base of everything raised on purpose by vdsmlite."""


class VdsmError(VdsmLiteError):
    """An error with a VDSM status code; the message follows VDSM's format."""

    code: ClassVar[int] = 100
    msg: ClassVar[str] = "General Exception"
    # How the HTTP stream doors answer this error.
    http_status: ClassVar[int] = 500

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        # What the message shows: the arguments, or one "k=v, ..." string (`_Fields`).
        self.value: Any = args

    @property
    def message(self) -> str:
        return f"{self.msg}: {self.value!r}"

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class _Fields(VdsmError):
    """Errors VDSM renders as one ``"k=v, k=v"`` string built from named fields."""

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        if len(args) == len(self.fields):
            self.value = ", ".join(f"{k}={v}" for k, v in zip(self.fields, args, strict=True))


# common (lib/vdsm/common/exception.py)


class NoSuchVM(VdsmError):
    """Reserved for VM verbs (virt) naming a vmId this host does not run; nothing
    raises it yet."""

    code = 1
    msg = "Virtual machine does not exist"


class VMExists(VdsmError):
    """Reserved for VM.create (virt) with a vmId this host already runs; nothing raises
    it yet."""

    code = 4
    msg = "Virtual machine already exists"


class CannotCreateVM(VdsmError):
    """VM.create (virt): a well-formed request this agent cannot run (network disks,
    payloads, leases, ...; `virt.domxml`, `virt.legacy`), a definition qemu must not
    see, or a qemu that would not start (`virt.qemu`, with qemu's own words)."""

    code = 9
    msg = "Error creating the requested VM"


class NoConnectionToPeer(VdsmError):
    """VM.migrate (virt.migration): the destination agent could not be reached."""

    code = 10
    msg = "Could not connect to peer VDS"


class MissingParameter(VdsmError):
    code = 11
    msg = "Missing required parameter"


class MigrationError(VdsmError):
    """VM.migrate (virt.migration): the migration failed (the destination refused,
    qemu's migration failed, ...); the VM keeps running on the source."""

    code = 12
    msg = "Fatal error during migration"


class ImageFileNotFound(VdsmError):
    """Reserved for VM.create / VM.hotplugDisk (virt): a disk's volume cannot be
    prepared; nothing raises it yet."""

    code = 13
    msg = "Image file not found"


class UnexpectedError(VdsmError):
    """Reserved for VM.create (virt): VDSM's answer to an unexpected failure there;
    nothing raises it yet."""

    code = 16
    msg = "Unexpected exception"


class LUNDoesNotExist(VdsmError):
    """Reserved for VM.create / VM.hotplugDisk (virt): a direct-LUN disk's GUID is not
    on this host; nothing raises it yet."""

    code = 37
    msg = "LUN does not exist"


class UnsupportedFenceAgent(VdsmError):
    code = 43
    msg = "Unsupported fencing agent"


class HotplugDiskFailed(VdsmError):
    """VM.hotplugDisk (virt): a disk this agent cannot plug (`virt.domxml`,
    `virt.legacy`), or a step qemu refused; what was added is removed again
    (`virt.qmp`)."""

    code = 45
    msg = "Failed to hotplug disk"


class HotunplugDiskFailed(VdsmError):
    """VM.hotunplugDisk (virt): a disk this agent cannot unplug (`virt.domxml`,
    `virt.legacy`), the guest did not release it in time (it stays attached), or
    qemu refused (`virt.qmp`)."""

    code = 46
    msg = "Failed to hotunplug disk"


class MigrationCancelationFailed(VdsmError):
    """VM.migrateCancel (virt.migration) of a VM that is not migrating."""

    code = 47
    msg = "Migration not in progress"


class MigrationNotInProgress(VdsmError):
    """VM.migrateChangeParams (virt.migration) of a VM that is not migrating."""

    code = 81
    msg = "Migration not in progress"


class MigrationLimitExceeded(VdsmError):
    """VM.migrationCreate (virt.manager) on a host already receiving as many
    migrations as it may at once; the source retries later."""

    code = 82
    msg = "Incoming migration limit exceeded"


class MigrationInProgress(VdsmError):
    """A VM verb that cannot run while the VM migrates (a second VM.migrate, pause,
    hot plug); virt.migration, virt.vm."""

    code = 51
    msg = "Command not supported during migration"


class SnapshotFailed(VdsmError):
    """VM.snapshot: the drives stay on their old leaves."""

    code = 48
    msg = "Snapshot failed"


class MergeFailed(VdsmError):
    """VM.merge that cannot start (`virt.livemerge`)."""

    code = 52
    msg = "Merge failed"


class NoSuchJob(VdsmError):
    """VM.mergeAbort naming a block job the VM does not run."""

    code = 66
    msg = "Job does not exist"


class JobExists(VdsmError):
    code = 69
    msg = "Job already exists"

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)


class UnsupportedOperation(VdsmError):
    code = 75
    msg = "Operation not supported"


class InvalidParameter(VdsmError):
    """Virt verbs' parameter checks, naming the field (`virt.checks`); storage verbs
    answer 1000, InvalidParameterException."""

    code = 91
    msg = "Invalid parameter"


class RecoveryInProgress(VdsmError):
    code = 99
    msg = "Recovering from crash or Initializing"


class GeneralException(VdsmError):
    code = 100
    msg = "General Exception"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


class InvalidConfiguration(VdsmError):
    code = 101
    msg = "Invalid configuration"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class ActionStopped(VdsmError):
    code = 443
    msg = "Action was stopped"


# storage (lib/vdsm/storage/exception.py)


class StorageException(VdsmError):
    code = 200
    msg = "General Storage Exception"


class InvalidParameterException(_Fields):
    code = 1000
    msg = "Invalid parameter"
    http_status = 400

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(name, value)
        self.value = f"{name}={value}"


class OvfConversionError(InvalidParameterException):
    """An OVF that cannot become VM parameters (`ovf.vmparams`): not a well-formed OVF,
    or missing what a VM cannot run without. The message names the OVF field."""

    msg = "Cannot convert OVF to VM parameters"

    def __init__(self, detail: str) -> None:
        VdsmError.__init__(self, detail)
        self.value = detail


class MiscFileReadException(StorageException):
    code = 2001
    msg = "Internal file read failure"


class TransferStalled(MiscFileReadException):
    """The client stopped sending before the stream was complete."""

    msg = "Transfer stalled: no data received in time"
    http_status = 408


class TransferInterrupted(MiscFileReadException):
    msg = "Transfer interrupted: the connection was closed before the end of the data"
    http_status = 400


class InvalidOvfStore(StorageException):
    code = 1000
    msg = "Invalid OVF_STORE archive"
    http_status = 400


class OvfStoreTooLarge(StorageException):
    code = 1000
    msg = "Data does not fit the volume"
    http_status = 413


class ShuttingDownError(StorageException):
    code = 3001
    msg = "Shutting down"


# volumes


class VolumeDoesNotExist(StorageException):
    code = 201
    msg = "Volume does not exist"
    http_status = 404

    def __init__(self, vol_uuid: str) -> None:
        super().__init__(vol_uuid)


class IncorrectFormat(StorageException):
    code = 202
    msg = "Incorrect Volume format"


class VolumeIsBusy(StorageException):
    code = 203
    msg = "Volume is busy"


class VolumeImageHasChildren(StorageException):
    code = 204
    msg = "Cannot delete volume which has children (non-ethical)"


class VolumeCreationError(StorageException):
    code = 205
    msg = "Error creating a new volume"


class VolumeExtendingError(StorageException):
    code = 206
    msg = "Error extending volume"


class VolumeMetadataReadError(StorageException):
    code = 207
    msg = "Error while processing volume meta data"


class VolumeMetadataWriteError(StorageException):
    code = 208
    msg = "Error while updating volume meta data"


class VolumeAlreadyExists(StorageException):
    code = 212
    msg = "Volume already exists"

    def __init__(self, vol_uuid: str) -> None:
        super().__init__(vol_uuid)


class CannotDeleteVolume(StorageException):
    code = 222
    msg = "Volume deletion error"


class PrepareIllegalVolumeError(StorageException):
    code = 227
    msg = "Cannot prepare illegal volume"


class CreateVolumeSizeError(StorageException):
    code = 229
    msg = "Requested size is too small. Must be larger or equal to 1"


class VolumeResizeValueError(StorageException):
    code = 232
    msg = "Incorrect size value for volume resize"


# images


class CopyImageError(StorageException):
    code = 261
    msg = "low level Image copy failed"
    http_status = 400


class ImageIsNotLegalChain(StorageException):
    code = 262
    msg = "Image is not a legal chain"


class ImageDoesNotExistInSD(_Fields):
    code = 268
    msg = "Image does not exist in domain"
    fields = ("image", "domain")
    http_status = 404

    def __init__(self, image: str, domain: str) -> None:
        super().__init__(image, domain)


# pools


class StoragePoolMasterNotFound(_Fields):
    code = 304
    msg = "Cannot find master domain"
    fields = ("spUUID", "msdUUID")

    def __init__(self, sp_uuid: str, msd_uuid: str | None) -> None:
        super().__init__(sp_uuid, msd_uuid)


class StoragePoolUnknown(StorageException):
    code = 309
    msg = "Unknown pool id, pool not connected"


class StoragePoolNotConnected(StorageException):
    """Reserved for SPM and pool verbs called before StoragePool.connect (they raise
    StoragePoolUnknown, 309, as VDSM's getPool does); nothing raises it yet."""

    code = 313
    msg = "Storage pool not connected"


class CannotConnectMultiplePools(StorageException):
    code = 323
    msg = "Cannot connect pool, already connected to another pool"


class MissingOvfFileFromVM(StorageException):
    code = 320
    msg = "Missing OVF file from VM"
    http_status = 404


class StoragePoolWrongMaster(_Fields):
    code = 324
    msg = "Wrong Master domain or its version"
    fields = ("SD", "pool")


class StoragePoolConnected(StorageException):
    """Reserved for pool verbs VDSM refuses on a connected pool (StoragePool.create, a
    connect with another host id); nothing raises it yet."""

    code = 325
    msg = "Cannot perform action while storage pool is connected"


# domains


class StorageDomainBlockSizeMismatch(StorageException):
    code = 348
    msg = "Block size does not match storage block size"


class StorageDomainActionError(StorageException):
    """Listed by schema.yml for StorageDomain.format, which raises 391 instead (see
    CannotFormatAttachedStorageDomain); nothing raises it yet."""

    code = 350
    msg = "Error in storage domain action"


class StorageDomainCreationError(StorageException):
    code = 351
    msg = "Error creating a storage domain"


class StorageDomainNotInPool(_Fields):
    code = 353
    msg = "Storage domain not in pool"
    fields = ("domain", "pool")

    def __init__(self, domain: str, pool: str) -> None:
        super().__init__(domain, pool)


class StorageDomainMasterError(StorageException):
    """StoragePool.getSpmStatus cannot read the master domain's SDM lease."""

    code = 355
    msg = "Error validating master storage domain"


class StorageDomainDoesNotExist(StorageException):
    code = 358
    msg = "Storage domain does not exist"
    http_status = 404

    def __init__(self, sd_uuid: str) -> None:
        super().__init__(sd_uuid)


class StorageDomainFSNotMounted(StorageException):
    code = 360
    msg = "Storage domain remote path not mounted"


class StorageDomainNotEmpty(StorageException):
    code = 361
    msg = "Storage domain is not empty - requires cleaning"


class StorageDomainAlreadyExists(StorageException):
    code = 365
    msg = "Storage domain already exists"


class StorageDomainNotActive(StorageException):
    """Reserved for SPM verbs on a domain that is not active in the pool; nothing
    raises it yet."""

    code = 369
    msg = "Storage domain not active"


class StorageDomainLayoutError(StorageException):
    code = 371
    msg = "Storage domain layout corrupted"


class StorageDomainTypeError(StorageException):
    code = 372
    msg = "Unsupported Storage Domain type"


class StorageDomainNotMemberOfPool(_Fields):
    """Reserved for SPM verbs naming a domain the pool does not hold; nothing raises it
    yet."""

    code = 375
    msg = "Domain is not member in pool"
    fields = ("pool", "domain")


class StorageDomainAccessError(StorageException):
    code = 379
    msg = "Domain is either partially accessible or entirely inaccessible"

    def __init__(self, sd_uuid: str, reason: str) -> None:
        super().__init__(sd_uuid, reason)


class StorageDomainAlreadyAttached(_Fields):
    code = 380
    msg = "Storage domain already attached to pool"
    fields = ("domain", "pool")

    def __init__(self, domain: str, pool: str) -> None:
        super().__init__(domain, pool)


class CannotDetachMasterStorageDomain(StorageException):
    code = 383
    msg = "Illegal action"


class StorageDomainDescriptionTooLongError(StorageException):
    code = 387
    msg = "Storage domain description is too long"


class StorageDomainIllegalRemotePath(StorageException):
    code = 390
    msg = "Remote path is illegal"


class CannotFormatAttachedStorageDomain(StorageException):
    code = 391
    msg = "Cannot format attached storage domain"


class UnsupportedDomainVersion(StorageException):
    code = 394
    msg = "Domain version is unsupported by this version of VDSM"


class CurrentVersionTooAdvancedError(StorageException):
    """StoragePool.spmStart with a domVersion older than the master domain's."""

    code = 395
    msg = "Current domain version is too advanced"

    def __init__(self, sd_uuid: str, cur_ver: int, exp_ver: int) -> None:
        super().__init__(sd_uuid, cur_ver, exp_ver)
        self.value = ""

    @property
    def message(self) -> str:
        sd_uuid, cur_ver, exp_ver = self.args
        return (f"Current domain `{sd_uuid}` version is too advanced, "
                f"expected `{exp_ver}` and found `{cur_ver}`")


class NoSpaceLeftOnDomain(StorageException):
    code = 397
    msg = "No space left on domain"

    def __init__(self, sd_uuid: str) -> None:
        super().__init__(sd_uuid)


# tasks


class UnknownTask(VdsmError):
    code = 401
    msg = "Task id unknown"

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)


class TaskNotFinished(VdsmError):
    code = 403
    msg = "Task not finished"

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)


class TaskAborted(VdsmError):
    code = 411
    msg = "Task is aborted"

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)


# connections


class StorageServerConnectionError(StorageException):
    code = 451
    msg = "Error storage server connection"


class StorageServerDisconnectionError(StorageException):
    code = 452
    msg = "Error storage server disconnection"




class StorageServeriSCSIError(StorageException):
    code = 454
    msg = "iSCSI connection error"


class AddiSCSINodeError(StorageServeriSCSIError):
    code = 460
    msg = "Add iSCSI node error"


class SetiSCSIAuthError(StorageServeriSCSIError):
    code = 461
    msg = "Set iSCSI authentication error"


class iSCSILoginError(StorageServeriSCSIError):
    code = 464
    msg = "Failed to login to iSCSI node"


class StorageServerAccessPermissionError(StorageException):
    code = 469
    msg = (
        "Permission settings on the specified path do not allow access to the storage. "
        "Verify permission settings on the specified storage path."
    )

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.value = f"path = {path}"




class iSCSILogoutError(StorageServeriSCSIError):
    code = 474
    msg = "Failed to logout from iSCSI node"


class iSCSIDiscoveryError(_Fields):
    code = 475
    msg = "Failed discovery of iSCSI targets"
    fields = ("portal", "err")


class iSCSILoginAuthError(StorageServeriSCSIError):
    code = 476
    msg = "Failed to login to iSCSI node due to authorization failure"


class MountError(StorageException):
    code = 477
    msg = "Problem while trying to mount target"


class StorageServerConnectionRefIdAlreadyInUse(StorageException):
    code = 478
    msg = "Connection Reference ID is already in use"


# LVM


class VolumeGroupCreateError(_Fields):
    code = 502
    msg = "Cannot create Volume Group"
    fields = ("vgname", "devname")


class VolumeGroupSizeError(StorageException):
    code = 504
    msg = "Volume Group not big enough"


class VolumeGroupAlreadyExistsError(StorageException):
    code = 505
    msg = "Volume Group Already Exists"


class VolumeGroupDoesNotExist(StorageException):
    code = 506
    msg = "Volume Group does not exist"


class VolumeGroupRemoveError(StorageException):
    code = 508
    msg = "Volume Group remove error"


class VolumeGroupHasDomainTag(StorageException):
    code = 515
    msg = "Volume Group has domain tag - requires cleaning"


class VolumeGroupBlockSizeError(StorageException):
    code = 517
    msg = "All devices in domain must have the same block size"


class CannotCreateLogicalVolume(StorageException):
    code = 550
    msg = "Cannot create Logical Volume"


class CannotRemoveLogicalVolume(StorageException):
    code = 551
    msg = "Cannot remove Logical Volume"


class CannotDeactivateLogicalVolume(StorageException):
    code = 552
    msg = "Cannot deactivate Logical Volume"


class LogicalVolumeExtendError(_Fields):
    code = 554
    msg = "Logical Volume extend failed"
    fields = ("vgname", "lvname", "newsize")


class CannotActivateLogicalVolume(StorageException):
    code = 558
    msg = "Cannot activate Logical Volume"


class InaccessiblePhysDev(StorageException):
    code = 606
    msg = "Multipath cannot access physical device(s)"

    def __init__(self, devices: Any) -> None:
        super().__init__(devices)
        self.value = f"devices={devices}"


class LogicalVolumeDoesNotExistError(StorageException):
    code = 610
    msg = "Logical volume does not exist"


# SPM / locks


class AcquireLockFailure(_Fields):
    code = 651
    msg = "Cannot obtain lock"
    fields = ("id", "rc", "out", "err")
    http_status = 409

    def __init__(self, resource: str | None, rc: int, out: str, err: str) -> None:
        super().__init__(resource, rc, out, err)


class LeaseLost(StorageException):
    """A lease this host held is gone (its lockspace was lost and sanlock revoked it):
    what was done under it may be incomplete; nothing more is done."""

    code = 651
    msg = "Lease lost"
    http_status = 409


class SpmStartError(StorageException):
    """StoragePool.spmStart failed for a reason with no code of its own."""

    code = 650
    msg = "Error starting SPM"


class SpmStopError(StorageException):
    """StoragePool.spmStop while operations still run under the SPM's lease."""

    code = 653
    msg = "Error stopping SPM, SPM has unfinished task(s)"


class SpmStatusError(StorageException):
    """Reserved for SPM-only verbs on a host that is not the SPM; nothing raises it yet."""

    code = 654
    msg = "Not SPM"


class IsSpm(StorageException):
    """StoragePool.spmStart on a host that is already SPM (or contending)."""

    code = 656
    msg = "Operation not allowed while SPM is active"


class AcquireHostIdFailure(StorageException):
    code = 661
    msg = "Cannot acquire host id"


class ReleaseHostIdFailure(StorageException):
    code = 662
    msg = "Cannot release host id"


class HostIdMismatch(StorageException):
    code = 700
    msg = "Host id not found or does not match manager host id"


class ClusterLockInitError(StorageException):
    code = 701
    msg = "Could not initialize cluster lock"


# metadata


class MetaDataGeneralError(StorageException):
    code = 749
    msg = "General Meta data error"


class MetaDataSealIsBroken(_Fields):
    code = 752
    msg = "Meta Data seal is broken (checksum mismatch)"
    fields = ("cksum", "computed_cksum")


class MetadataOverflowError(MetaDataGeneralError):
    code = 756
    msg = "Metadata is too big. Cannot change Metadata"


class InvalidVolumeUpdate(_Fields):
    code = 235
    msg = "Cannot update volume attributes"
    fields = ("vol_id", "reason")


class GenerationMismatch(_Fields):
    code = 911
    msg = "The provided generation does not match the actual generation"
    fields = ("requested", "actual")


class VolumeIsNotInChain(_Fields):
    code = 920
    msg = "Volume is not part of the chain."
    # VDSM's own order (vol_id shown as sd_id and so on) is a bug; keep the names right.
    fields = ("sd_id", "img_id", "vol_id")


class WrongParentVolume(_Fields):
    code = 921
    msg = "Wrong parent volume."
    fields = ("vol_id", "parent_id")


class SharedVolumeNonWritable(StorageException):
    code = 219
    msg = "Shared volume is read only"


class StorageDomainIsMemberOfPool(StorageException):
    code = 900
    msg = "Storage domain is member of pool"

    def __init__(self, sd_uuid: str) -> None:
        super().__init__(sd_uuid)
        self.value = f"domain={sd_uuid}"


class NoSuchLease(_Fields):
    """An external lease (Lease.*, the xleases index) that the index does not name."""

    code = 936
    msg = "No such lease"
    fields = ("lease",)

    def __init__(self, lease_id: str) -> None:
        super().__init__(lease_id)


# xleases (lib/vdsm/storage/xlease.py). VDSM raises these as plain errors, not
# storage exceptions: its dispatcher and its tasks answer them with code 100 and
# the error's own text, which is what `message` gives here.


class XleasesError(VdsmError):
    code = 100
    msg = "General Exception"
    text: str = ""

    @property
    def message(self) -> str:
        return self.text


class LeaseExists(XleasesError):
    def __init__(self, lease_id: str) -> None:
        super().__init__(lease_id)
        self.text = f"Lease {lease_id} exists"


class XleasesNoSpace(XleasesError):
    """VDSM's xlease.NoSpace: every record of the index, or every slot of the volume,
    is used."""

    def __init__(self, lease_id: str) -> None:
        super().__init__(lease_id)
        self.text = f"No space to add lease {lease_id}"


class InvalidRecord(XleasesError):
    def __init__(self, reason: str, record: bytes) -> None:
        super().__init__(reason, record)
        self.text = f"Invalid record ({reason}): {record!r}"


class InvalidIndex(XleasesError):
    """The index cannot be used: it must be rebuilt (Lease.rebuild_leases) or formatted."""


class IndexIsUpdating(InvalidIndex):
    def __init__(self, metadata: str) -> None:
        super().__init__(metadata)
        self.text = ("Index is updating or an update operation was aborted, the index "
                     f"must be formatted or rebuilt from storage: {metadata}")


class InvalidIndexMetadata(InvalidIndex):
    """VDSM's xlease.InvalidMetadata (not the 751 of volume metadata)."""

    def __init__(self, reason: str, data: bytes) -> None:
        super().__init__(reason, data)
        self.text = (f"Invalid index metadata ({reason}), the index must be formatted or "
                     f"rebuilt from storage: {data[:80]!r}")


class TruncatedIndex(InvalidIndex):
    def __init__(self, expected: int, available: int) -> None:
        super().__init__(expected, available)
        self.text = (f"Could not read index, expected {expected} bytes, available "
                     f"{available} bytes")


def all_vdsm_errors() -> list[type[VdsmError]]:
    """Every concrete VDSM error class, for the schema's error table and tests."""
    found: list[type[VdsmError]] = []
    pending: list[type[VdsmError]] = [VdsmError]
    while pending:
        cls = pending.pop()
        if not cls.__name__.startswith("_"):
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: (c.code, c.__name__))
