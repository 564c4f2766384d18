"""A typed binding to sanlock's client library (``libsanlock_client.so.1``) via cffi.

ABI mode: the library is opened at run time and no compiler or header is
needed; the declarations below follow sanlock 3.8.5's public headers, and a
test checks the struct sizes against them. Every function here blocks (it
talks to the sanlock daemon over its unix socket, or does the daemon's disk
I/O by proxy): call them from a worker thread, never from the event loop.

Conventions:

* names of lockspaces and resources are ``str`` of at most 48 bytes; paths
  are ``str``; disks are ``(path, offset)`` pairs;
* results are Python values (dataclasses, lists), never cffi objects; buffers
  the library allocates are freed here;
* a negative return becomes `SanlockError` carrying the errno (positive) and
  sanlock's own message for its ``SANLK_*`` codes (-2xx), the C library's
  otherwise.

Two properties of the library shape its users (see docs of the callers):
it reads ``SANLOCK_RUN_DIR`` once per process, on its first connection, so a
process talks to exactly one sanlock daemon; and leases belong to the process
that registered, which sanlock kills when the lockspace is lost - so the agent
holds leases from a helper process (`vdsmlite.locking.holder`).
"""

from __future__ import annotations

import errno as errno_
import functools
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cffi

NAME_LEN = 48
PATH_LEN = 1024
MAX_DISKS = 4

# Host states (sanlk_host.flags & SANLK_HOST_MASK).
HOST_UNKNOWN, HOST_FREE, HOST_LIVE, HOST_FAIL, HOST_DEAD = 1, 2, 3, 4, 5
HOST_STATE_NAMES = {HOST_UNKNOWN: "unknown", HOST_FREE: "free", HOST_LIVE: "live",
                    HOST_FAIL: "fail", HOST_DEAD: "dead"}
_HOST_MASK = 0x0F

# sanlock's own error codes (returned negated).
SANLK_LEADER_MAGIC = 223       # read_resource: no paxos leader here (never written, or cleared)
SANLK_ACQUIRE_IDLIVE = 243     # "Lease is held by another host"
SANLK_ACQUIRE_OWNED_RETRY = 247  # OWNER_NOWAIT: held by a host not known dead yet
SANLK_ACQUIRE_OTHER = 244
SANLK_ACQUIRE_OWNED = 245

# set_event flags
SETEV_CUR_GENERATION = 0x01
SETEV_CLEAR_HOSTID = 0x02
SETEV_CLEAR_EVENT = 0x04
SETEV_REPLACE_EVENT = 0x08
SETEV_ALL_HOSTS = 0x10

# set_config commands
CONFIG_USED = 0x01
CONFIG_UNUSED = 0x02

_ADD_ASYNC = 0x01
_REM_ASYNC = 0x01
_REM_UNUSED = 0x02
_INQ_WAIT = 0x01
_WRITE_CLEAR = 0x01
_ACQUIRE_OWNER_NOWAIT = 0x08
_RES_SHARED = 0x04

_ALIGN_FLAGS = {1 << 20: 0x10, 2 << 20: 0x20, 4 << 20: 0x40, 8 << 20: 0x80}
_SECTOR_FLAGS = {512: 0x100, 4096: 0x200}

_CDEF = """
struct sanlk_disk { char path[1024]; uint64_t offset; uint32_t pad1; uint32_t pad2; };
struct sanlk_resource {
    char lockspace_name[48]; char name[48];
    uint64_t lver; uint64_t data64; uint32_t data32; uint32_t unused;
    uint32_t flags; uint32_t num_disks;
    struct sanlk_disk disks[];
};
struct sanlk_lockspace {
    char name[48]; uint64_t host_id; uint32_t flags; struct sanlk_disk host_id_disk;
};
struct sanlk_host {
    uint64_t host_id; uint64_t generation; uint64_t timestamp;
    uint32_t io_timeout; uint32_t flags;
};
struct sanlk_host_event { uint64_t host_id; uint64_t generation; uint64_t event; uint64_t data; };
struct sanlk_options { char owner_name[48]; uint32_t flags; uint32_t len; char str[]; };

const char *sanlock_strerror(int rv);
int sanlock_version(uint32_t flags, uint32_t *version, uint32_t *proto);
int sanlock_write_lockspace(struct sanlk_lockspace *ls, int max_hosts, uint32_t flags,
                            uint32_t io_timeout);
int sanlock_read_lockspace(struct sanlk_lockspace *ls, uint32_t flags, uint32_t *io_timeout);
int sanlock_write_resource(struct sanlk_resource *res, int max_hosts, int num_hosts,
                           uint32_t flags);
int sanlock_add_lockspace_timeout(struct sanlk_lockspace *ls, uint32_t flags,
                                  uint32_t io_timeout);
int sanlock_inq_lockspace(struct sanlk_lockspace *ls, uint32_t flags);
int sanlock_rem_lockspace(struct sanlk_lockspace *ls, uint32_t flags);
int sanlock_get_lockspaces(struct sanlk_lockspace **lss, int *lss_count, uint32_t flags);
int sanlock_get_hosts(const char *ls_name, uint64_t host_id, struct sanlk_host **hss,
                      int *hss_count, uint32_t flags);
int sanlock_set_config(const char *ls_name, uint32_t flags, uint32_t cmd, void *data);
int sanlock_read_resource(struct sanlk_resource *res, uint32_t flags);
int sanlock_read_resource_owners(struct sanlk_resource *res, uint32_t flags,
                                 struct sanlk_host **hss, int *hss_count);
int sanlock_register(void);
int sanlock_acquire(int sock, int pid, uint32_t flags, int res_count,
                    struct sanlk_resource *res_args[], struct sanlk_options *opt_in);
int sanlock_release(int sock, int pid, uint32_t flags, int res_count,
                    struct sanlk_resource *res_args[]);
int sanlock_inquire(int sock, int pid, uint32_t flags, int *res_count, char **res_state);
int sanlock_reg_event(const char *ls_name, struct sanlk_host_event *he, uint32_t flags);
int sanlock_end_event(int fd, const char *ls_name, uint32_t flags);
int sanlock_set_event(const char *ls_name, struct sanlk_host_event *he, uint32_t flags);
int sanlock_get_event(int fd, uint32_t flags, struct sanlk_host_event *he,
                      uint64_t *from_host_id, uint64_t *from_generation);
void free(void *ptr);
"""

# The sizes sanlock 3.8.5's headers give (checked by the tests).
STRUCT_SIZES = {"struct sanlk_disk": 1040, "struct sanlk_resource": 128,
                "struct sanlk_lockspace": 1104, "struct sanlk_host": 32,
                "struct sanlk_host_event": 32, "struct sanlk_options": 56}


class SanlockError(Exception):
    """A sanlock call failed. `errno` is positive: an errno, or a SANLK_* code (2xx)."""

    def __init__(self, op: str, errno: int, message: str) -> None:
        super().__init__(f"sanlock {op} failed: {message} ({errno})")
        self.op = op
        self.errno = errno
        self.message = message


class DaemonUnreachable(SanlockError):
    """No sanlock daemon answers on the socket this process talks to: the call never
    reached sanlock (its errno - ENOENT, ECONNREFUSED - is the socket's, not storage's)."""

    def __init__(self, op: str, errno: int, path: str, reason: str) -> None:
        run_dir = os.path.dirname(path)
        message = (f"no sanlock daemon is reachable at {path} ({reason}); start it "
                   f"(`systemctl start sanlock`, or `SANLOCK_RUN_DIR={run_dir} sanlock "
                   f"daemon`), or set [sanlock] run_dir to the run directory of the "
                   f"sanlock daemon of this host")
        super().__init__(op, errno, message)
        Exception.__init__(self, f"sanlock {op}: {message}")
        self.path = path


def socket_path() -> str:
    """The daemon's socket as libsanlock finds it (SANLOCK_RUN_DIR, else /run/sanlock)."""
    return os.path.join(os.environ.get("SANLOCK_RUN_DIR") or "/run/sanlock", "sanlock.sock")


def daemon_problem() -> str | None:
    """Why no daemon answers on `socket_path()`, or None when one accepts connections."""
    path = socket_path()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(path)
    except OSError as e:
        return f"connecting to it: {e.strerror or e}"
    finally:
        s.close()
    return None


@dataclass(frozen=True)
class Host:
    """A host as a lockspace sees it (sanlk_host)."""

    host_id: int
    generation: int
    timestamp: int
    io_timeout: int
    state: str  # unknown, free, live, fail, dead


@dataclass(frozen=True)
class Resource:
    """What a paxos lease on storage says it is (read_resource)."""

    lockspace: str
    name: str
    version: int  # the lease version (lver): bumped by every acquire


@dataclass(frozen=True)
class Lockspace:
    name: str
    host_id: int
    path: str
    offset: int


@dataclass(frozen=True)
class Event:
    """A host event as received: addressed to `host_id`/`generation`, from `from_host_id`."""

    host_id: int
    generation: int
    event: int
    data: int
    from_host_id: int
    from_generation: int


class _Lib:
    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.lib = self.ffi.dlopen("libsanlock_client.so.1")
        self.libc = self.ffi.dlopen(None)


@functools.cache
def _get() -> _Lib:
    try:
        return _Lib()
    except OSError as e:
        raise SanlockError("load", errno_.ENOENT,
                           f"libsanlock_client.so.1 is not installed ({e})") from e


def available() -> bool:
    try:
        _get()
    except SanlockError:
        return False
    return True


def _check(op: str, rv: int) -> int:
    if rv >= 0:
        return rv
    code = -rv
    if code in (errno_.ENOENT, errno_.ECONNREFUSED, errno_.ECONNRESET, errno_.EPIPE):
        # The C library says the same for "no daemon" as for "no such lockspace":
        # ask the socket which one it is.
        problem = daemon_problem()
        if problem is not None:
            raise DaemonUnreachable(op, code, socket_path(), problem)
    if code >= 200:
        ffi, lib = _get().ffi, _get().lib
        message = ffi.string(lib.sanlock_strerror(rv)).decode(errors="replace")
    else:
        message = os.strerror(code)
    raise SanlockError(op, code, message)


def _name(value: str, what: str, *, allow_empty: bool = False) -> bytes:
    raw = value.encode()
    if (not raw and not allow_empty) or len(raw) > NAME_LEN or b"\0" in raw:
        raise ValueError(f"sanlock {what} name must be 1..{NAME_LEN} bytes without NUL: "
                         f"{value!r}")
    return raw


def _path(value: str) -> bytes:
    raw = os.fsencode(value)
    if not raw or len(raw) >= PATH_LEN or b"\0" in raw:
        raise ValueError(f"sanlock path must be 1..{PATH_LEN - 1} bytes: {value!r}")
    return raw


def _geometry(prefix: str, align: int | None, sector: int | None) -> int:
    if align is None and sector is None:
        return 0
    if align not in _ALIGN_FLAGS or sector not in _SECTOR_FLAGS:
        raise ValueError(f"invalid sanlock {prefix} geometry: align={align} sector={sector}")
    return _ALIGN_FLAGS[align] | _SECTOR_FLAGS[sector]


def _lockspace(name: str, host_id: int, path: str, offset: int, flags: int = 0) -> Any:
    lib = _get()
    ls = lib.ffi.new("struct sanlk_lockspace *")
    raw = _name(name, "lockspace")
    lib.ffi.memmove(ls.name, raw, len(raw))
    ls.host_id = host_id
    ls.flags = flags
    raw_path = _path(path)
    lib.ffi.memmove(ls.host_id_disk.path, raw_path, len(raw_path))
    ls.host_id_disk.offset = offset
    return ls


def _resource(lockspace: str, name: str, disks: Sequence[tuple[str, int]],
              flags: int = 0, *, allow_empty: bool = False) -> Any:
    if not 1 <= len(disks) <= MAX_DISKS:
        raise ValueError(f"a sanlock resource has 1..{MAX_DISKS} disks, not {len(disks)}")
    lib = _get()
    # cffi sizes the flexible array from the initializer and zero-fills everything,
    # pads included (the daemon reuses the wire struct internally).
    res = lib.ffi.new("struct sanlk_resource *", {"num_disks": len(disks),
                                                  "disks": [{} for _ in disks]})
    ls_raw = _name(lockspace, "lockspace", allow_empty=allow_empty)
    name_raw = _name(name, "resource", allow_empty=allow_empty)
    lib.ffi.memmove(res.lockspace_name, ls_raw, len(ls_raw))
    lib.ffi.memmove(res.name, name_raw, len(name_raw))
    res.flags = flags
    for i, (path, offset) in enumerate(disks):
        raw_path = _path(path)
        lib.ffi.memmove(res.disks[i].path, raw_path, len(raw_path))
        res.disks[i].offset = offset
    return res


def _hosts(op: str, call: Any) -> list[Host]:
    lib = _get()
    hss = lib.ffi.new("struct sanlk_host **")
    count = lib.ffi.new("int *")
    rv = call(hss, count)
    try:
        _check(op, rv)
        return [Host(host_id=h.host_id, generation=h.generation, timestamp=h.timestamp,
                     io_timeout=h.io_timeout,
                     state=HOST_STATE_NAMES.get(h.flags & _HOST_MASK, "unknown"))
                for h in (hss[0][i] for i in range(count[0]))]
    finally:
        if hss[0] != lib.ffi.NULL:
            lib.libc.free(hss[0])


# --- the daemon -------------------------------------------------------------------------


def version() -> tuple[int, int]:
    """(daemon version, protocol version) as the running daemon reports them."""
    lib = _get()
    ver, proto = lib.ffi.new("uint32_t *"), lib.ffi.new("uint32_t *")
    _check("version", lib.lib.sanlock_version(0, ver, proto))
    return ver[0], proto[0]


# --- formatting areas on storage --------------------------------------------------------


def write_lockspace(name: str, path: str, offset: int = 0, *, max_hosts: int = 0,
                    io_timeout: int = 0, align: int | None = None,
                    sector: int | None = None) -> None:
    """Format a lockspace (delta leases). io_timeout is stored on disk: pass the one
    hosts will join with, or the first join waits for the stored one (2x)."""
    ls = _lockspace(name, 0, path, offset, _geometry("lockspace", align, sector))
    _check("write_lockspace",
           _get().lib.sanlock_write_lockspace(ls, max_hosts, 0, io_timeout))


def read_lockspace(path: str, offset: int = 0, *, align: int | None = None,
                   sector: int | None = None) -> tuple[str, int]:
    """(lockspace name, io_timeout) of the lockspace formatted at path:offset."""
    lib = _get()
    ls = lib.ffi.new("struct sanlk_lockspace *")
    raw_path = _path(path)
    lib.ffi.memmove(ls.host_id_disk.path, raw_path, len(raw_path))
    ls.host_id_disk.offset = offset
    ls.flags = _geometry("lockspace", align, sector)
    timeout = lib.ffi.new("uint32_t *")
    _check("read_lockspace", lib.lib.sanlock_read_lockspace(ls, 0, timeout))
    return lib.ffi.string(ls.name, NAME_LEN).decode(errors="replace"), timeout[0]


def write_resource(lockspace: str, name: str, disks: Sequence[tuple[str, int]], *,
                   max_hosts: int = 0, num_hosts: int = 0, align: int | None = None,
                   sector: int | None = None, clear: bool = False) -> None:
    """Format a paxos lease. `clear` writes one that later reads refuse (a deleted lease).

    Empty names (both) write the lease VDSM writes over a removed external lease:
    readable, but naming nothing (see `storage.xleases`).
    """
    empty = lockspace == "" and name == ""
    res = _resource(lockspace, name, disks, _geometry("resource", align, sector),
                    allow_empty=empty)
    _check("write_resource", _get().lib.sanlock_write_resource(
        res, max_hosts, num_hosts, _WRITE_CLEAR if clear else 0))


# --- lockspaces (host ids) --------------------------------------------------------------


def add_lockspace(name: str, host_id: int, path: str, offset: int = 0, *,
                  io_timeout: int = 0, wait: bool = True) -> None:
    """Join a lockspace with `host_id`. With wait=False it returns at once and
    `inq_lockspace` tells when the join is done (EINPROGRESS meanwhile)."""
    ls = _lockspace(name, host_id, path, offset)
    _check("add_lockspace", _get().lib.sanlock_add_lockspace_timeout(
        ls, 0 if wait else _ADD_ASYNC, io_timeout))


def inq_lockspace(name: str, host_id: int, path: str, offset: int = 0, *,
                  wait: bool = False) -> bool | None:
    """True: joined; False: not joined; None: being added or removed."""
    ls = _lockspace(name, host_id, path, offset)
    rv = _get().lib.sanlock_inq_lockspace(ls, _INQ_WAIT if wait else 0)
    if rv == 0:
        return True
    if rv == -errno_.ENOENT:
        return False
    if rv in (-errno_.EINPROGRESS, -errno_.EAGAIN):
        return None
    _check("inq_lockspace", rv)
    return None  # unreachable: _check raised


def rem_lockspace(name: str, host_id: int, path: str, offset: int = 0, *,
                  wait: bool = True, unused: bool = False) -> None:
    """Leave a lockspace. sanlock kills processes holding leases in it, unless
    `unused` (then it refuses with EBUSY while any lease is held)."""
    ls = _lockspace(name, host_id, path, offset)
    flags = (0 if wait else _REM_ASYNC) | (_REM_UNUSED if unused else 0)
    _check("rem_lockspace", _get().lib.sanlock_rem_lockspace(ls, flags))


def get_lockspaces() -> list[Lockspace]:
    lib = _get()
    lss = lib.ffi.new("struct sanlk_lockspace **")
    count = lib.ffi.new("int *")
    rv = lib.lib.sanlock_get_lockspaces(lss, count, 0)
    try:
        _check("get_lockspaces", rv)
        out = []
        for i in range(count[0]):
            ls = lss[0][i]
            out.append(Lockspace(
                name=lib.ffi.string(ls.name, NAME_LEN).decode(errors="replace"),
                host_id=ls.host_id,
                path=os.fsdecode(lib.ffi.string(ls.host_id_disk.path, PATH_LEN)),
                offset=ls.host_id_disk.offset))
        return out
    finally:
        if lss[0] != lib.ffi.NULL:
            lib.libc.free(lss[0])


def get_hosts(lockspace: str, host_id: int = 0) -> list[Host]:
    """The hosts of a joined lockspace (host_id 0: all with a lease seen), as this
    host's daemon last saw them. EAGAIN for a few seconds after joining."""
    raw = _name(lockspace, "lockspace")
    lib = _get().lib
    return _hosts("get_hosts",
                  lambda hss, count: lib.sanlock_get_hosts(raw, host_id, hss, count, 0))


def set_config(lockspace: str, cmd: int) -> None:
    """CONFIG_USED: the lockspace may not exit cleanly on storage loss (the
    watchdog must fire instead), as sanlk-resetd does before replying to a reset."""
    _check("set_config", _get().lib.sanlock_set_config(
        _name(lockspace, "lockspace"), 0, cmd, _get().ffi.NULL))


# --- resources (paxos leases) -----------------------------------------------------------


def register() -> int:
    """A connection to the daemon that owns this process's leases (keep it open)."""
    return _check("register", _get().lib.sanlock_register())


def acquire(sock: int, lockspace: str, resource: str, disks: Sequence[tuple[str, int]], *,
            owner_nowait: bool = False, shared: bool = False, pid: int = -1) -> None:
    """Acquire for the process registered on `sock` (or, with `sock` -1, for the
    registered process `pid`: how a lease is handed to a qemu that registered itself).
    SANLK_ACQUIRE_IDLIVE (243) if a live host holds it; with owner_nowait,
    SANLK_ACQUIRE_OWNED_RETRY (247) instead of waiting for an owner that stopped
    renewing to be declared dead."""
    lib = _get()
    res = _resource(lockspace, resource, disks, _RES_SHARED if shared else 0)
    args = lib.ffi.new("struct sanlk_resource *[1]", [res])
    flags = _ACQUIRE_OWNER_NOWAIT if owner_nowait else 0
    _check("acquire", lib.lib.sanlock_acquire(sock, pid, flags, 1, args, lib.ffi.NULL))


def release(sock: int, lockspace: str, resource: str,
            disks: Sequence[tuple[str, int]], *, pid: int = -1) -> None:
    """Release for the process on `sock`, or with `sock` -1 for the registered `pid`."""
    lib = _get()
    res = _resource(lockspace, resource, disks)
    args = lib.ffi.new("struct sanlk_resource *[1]", [res])
    _check("release", lib.lib.sanlock_release(sock, pid, 0, 1, args))


def inquire(sock: int, *, pid: int = -1) -> list[tuple[str, str]]:
    """(lockspace, resource) of every lease the process on `sock` (or, with `sock`
    -1, the registered process `pid`) holds."""
    lib = _get()
    count = lib.ffi.new("int *")
    state = lib.ffi.new("char **")
    rv = lib.lib.sanlock_inquire(sock, pid, 0, count, state)
    try:
        _check("inquire", rv)
        if state[0] == lib.ffi.NULL:
            return []
        text = lib.ffi.string(state[0]).decode(errors="replace")
    finally:
        if state[0] != lib.ffi.NULL:
            lib.libc.free(state[0])
    # "LS:RES:path:offset[:path:offset...]:lver RES2..." - resources separated by
    # spaces; ':' inside paths is escaped, and only the first two fields matter here.
    out = []
    for item in text.split():
        parts = item.split(":")
        if len(parts) >= 2:
            out.append((parts[0], parts[1]))
    return out


def read_resource(path: str, offset: int, *, align: int | None = None,
                  sector: int | None = None) -> Resource:
    """The paxos lease at path:offset as written on storage (no lockspace needed).

    SanlockError with errno SANLK_LEADER_MAGIC where no lease was ever written, or
    one was cleared.
    """
    lib = _get()
    res = lib.ffi.new("struct sanlk_resource *", {"num_disks": 1, "disks": [{}]})
    raw_path = _path(path)
    lib.ffi.memmove(res.disks[0].path, raw_path, len(raw_path))
    res.disks[0].offset = offset
    res.flags = _geometry("resource", align, sector)
    _check("read_resource", lib.lib.sanlock_read_resource(res, 0))
    return Resource(
        lockspace=lib.ffi.string(res.lockspace_name, NAME_LEN).decode(errors="replace"),
        name=lib.ffi.string(res.name, NAME_LEN).decode(errors="replace"),
        version=res.lver)


def read_resource_owners(lockspace: str, resource: str, disks: Sequence[tuple[str, int]], *,
                         align: int | None = None, sector: int | None = None) -> list[Host]:
    """Who holds a lease, read from storage (no lockspace membership needed)."""
    res = _resource(lockspace, resource, disks, _geometry("resource", align, sector))
    lib = _get().lib
    return _hosts("read_resource_owners",
                  lambda hss, count: lib.sanlock_read_resource_owners(res, 0, hss, count))


# --- host events (fencing requests and replies) -----------------------------------------


def reg_event(lockspace: str) -> int:
    """An fd that becomes readable when events for this host arrive in a joined
    lockspace (ENOENT before joining). Read with `get_events`; close with `end_event`."""
    return _check("reg_event", _get().lib.sanlock_reg_event(
        _name(lockspace, "lockspace"), _get().ffi.NULL, 0))


def end_event(fd: int, lockspace: str) -> None:
    _check("end_event", _get().lib.sanlock_end_event(fd, _name(lockspace, "lockspace"), 0))


def set_event(lockspace: str, host_id: int, generation: int, event: int, *, data: int = 0,
              flags: int = 0) -> None:
    """Ask this host's daemon to publish an event for `host_id` at its next renewals
    (set_bitmap_seconds long, so targets see it 2-3 times)."""
    lib = _get()
    he = lib.ffi.new("struct sanlk_host_event *",
                     {"host_id": host_id, "generation": generation, "event": event,
                      "data": data})
    _check("set_event", lib.lib.sanlock_set_event(_name(lockspace, "lockspace"), he, flags))


def get_events(fd: int) -> list[Event]:
    """Every event waiting on `fd` (possibly none). SanlockError EPIPE when the fd is
    dead (lockspace removed, daemon gone): register again after re-joining."""
    lib = _get()
    out: list[Event] = []
    while True:
        he = lib.ffi.new("struct sanlk_host_event *")
        from_id, from_gen = lib.ffi.new("uint64_t *"), lib.ffi.new("uint64_t *")
        rv = lib.lib.sanlock_get_event(fd, 0, he, from_id, from_gen)
        if rv == -errno_.EAGAIN:
            return out
        if rv == -1:
            raise SanlockError("get_event", errno_.EPIPE,
                               "event connection closed (lockspace removed or daemon gone)")
        _check("get_event", rv)
        out.append(Event(host_id=he.host_id, generation=he.generation, event=he.event,
                         data=he.data, from_host_id=from_id[0], from_generation=from_gen[0]))
