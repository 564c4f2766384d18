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

import argparse
import os
import sys

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


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdsmlite.virt.leaseexec")
    parser.add_argument("lockspace")
    parser.add_argument("resource")
    parser.add_argument("path")
    parser.add_argument("offset", type=int)
    parser.add_argument("--register-only", action="store_true")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    if not argv:
        print("leaseexec: nothing to run", file=sys.stderr)
        return EXIT_USAGE
    disk = (ns.path, ns.offset)
    try:
        sock = sanlock.register()
        # The registration must survive exec: it is what makes qemu the owner.
        os.set_inheritable(sock, True)
        if not ns.register_only:
            sanlock.acquire(sock, ns.lockspace, ns.resource, [disk])
    except sanlock.SanlockError as e:
        print(f"{REFUSED}: lease {ns.resource} in lockspace {ns.lockspace} "
              f"({ns.path}:{ns.offset}): {e}", file=sys.stderr, flush=True)
        return EXIT_LEASE_REFUSED
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"leaseexec: cannot run {argv[0]}: {e}", file=sys.stderr, flush=True)
    return 127


if __name__ == "__main__":
    sys.exit(main())
