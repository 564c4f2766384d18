"""Harness daemons end with the test run that started them.

They run in their own session (so a test can signal one without hitting the
runner), which also means nothing stops them if the runner is killed. The
kernel's parent-death signal does: ``setpriv --pdeathsig`` sets it and then
execs the daemon, so the pid the harness records is still the daemon's own.
The signal follows the *thread* that forked: start harness daemons from the
runner's main thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal as signals
from pathlib import Path


def tied_to_this_process(argv: list[str], signal: str = "TERM") -> list[str]:
    """`argv` wrapped so the process gets `signal` when the runner dies."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # util-linux without setpriv: daemons may outlive a killed run
        return argv
    return [setpriv, "--pdeathsig", signal, *argv]


def kill_vms_left_in(vm_run_dir: Path) -> None:
    """The qemus an agent left in its `[virt] run_dir` (a failed test or bench).

    VMs outlive their agent by design, so nothing ties them to the runner; each
    is found by the pid in its pidfile and killed by PID, only while that pid's
    command line still names the pidfile (a reused pid is someone else's)."""
    for pidfile in Path(vm_run_dir).glob("*/qemu.pid"):
        try:
            pid = int(pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pidfile).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signals.SIGKILL)
