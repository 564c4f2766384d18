"""Run a program as the owner of a sanlock lease: register, acquire, then exec.

``python -m vdsmlite.virt.leaseexec LOCKSPACE RESOURCE PATH OFFSET [--register-only]
-- ARGV...``

A VM with a lease (an HA VM) must run only while it holds that lease, and
what holds it must be qemu itself: sanlock ties a lease to the process that
registered, kills that process if the host loses the lockspace (so a VM whose
host can no longer prove it is alive stops writing before another host may
start it), and frees the lease when that process exits, however it exits.
This is libvirt's sanlock lock manager's scheme, without libvirt: the process
registers with the sanlock daemon, acquires, and execs qemu, keeping both its
pid and its registration socket, so the lease is qemu's from its first
instruction.

``--register-only`` registers without acquiring: a migration destination's
qemu must not hold the lease while the source still runs; the agent acquires
it on the registered pid's behalf (``sanlock_acquire(-1, pid, ...)``) when
the VM moves.

Failures are written to stderr, which is the VM's qemu log, so the agent
reports them as the reason the VM did not start; the exit status tells
a lease refused (`EXIT_LEASE_REFUSED`) from other errors.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from vdsmlite.locking import sanlock

EXIT_LEASE_REFUSED = 75  # EX_TEMPFAIL: another host holds it, try elsewhere/later
EXIT_USAGE = 64  # EX_USAGE

# The words the agent looks for in the log to tell a refused lease from a crash.
REFUSED = "VM lease refused"


def lease_argv(lockspace: str, resource: str, path: str, offset: int, argv: list[str], *,
               register_only: bool = False) -> list[str]:
    """The command line that runs `argv` as the owner of the lease."""
    out = [sys.executable, "-m", "vdsmlite.virt.leaseexec", lockspace, resource, path,
           str(offset)]
    if register_only:
        out.append("--register-only")
    return [*out, "--", *argv]


@dataclass(frozen=True)
class Invocation:
    lockspace: str
    resource: str
    path: str
    offset: int
    register_only: bool
    argv: list[str]


def parse(args: list[str]) -> Invocation:
    """Our arguments end at the first "--"; what follows is the program's, untouched
    (qemu's own arguments may look like ours). ValueError if malformed."""
    if "--" not in args:
        raise ValueError("no '--' before the command to run")
    split = args.index("--")
    ours, argv = args[:split], args[split + 1:]
    if not argv:
        raise ValueError("nothing to run")
    register_only = "--register-only" in ours
    positional = [a for a in ours if a != "--register-only"]
    if len(positional) != 4 or any(a.startswith("-") for a in positional[:3]):
        raise ValueError(f"expected LOCKSPACE RESOURCE PATH OFFSET, got {ours!r}")
    lockspace, resource, path, offset = positional
    return Invocation(lockspace, resource, path, int(offset), register_only, argv)


def main(args: list[str] | None = None) -> int:
    try:
        inv = parse(sys.argv[1:] if args is None else args)
    except ValueError as e:
        print(f"leaseexec: {e}", file=sys.stderr)
        return EXIT_USAGE
    disk = (inv.path, inv.offset)
    try:
        sock = sanlock.register()
        # The registration must survive exec: it is what makes qemu the owner.
        os.set_inheritable(sock, True)
        if not inv.register_only:
            sanlock.acquire(sock, inv.lockspace, inv.resource, [disk])
    except sanlock.SanlockError as e:
        print(f"{REFUSED}: lease {inv.resource} in lockspace {inv.lockspace} "
              f"({inv.path}:{inv.offset}): {e}", file=sys.stderr, flush=True)
        return EXIT_LEASE_REFUSED
    try:
        os.execvp(inv.argv[0], inv.argv)
    except OSError as e:
        print(f"leaseexec: cannot run {inv.argv[0]}: {e}", file=sys.stderr, flush=True)
    return 127


if __name__ == "__main__":
    sys.exit(main())
