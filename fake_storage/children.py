"""Harness daemons end with the test run that started them.

They run in their own session (so a test can signal one without hitting the
runner), which also means nothing stops them if the runner is killed. The
kernel's parent-death signal does: ``setpriv --pdeathsig`` sets it and then
execs the daemon, so the pid the harness records is still the daemon's own.
The signal follows the *thread* that forked: start harness daemons from the
runner's main thread.
"""

from __future__ import annotations

import shutil


def tied_to_this_process(argv: list[str], signal: str = "TERM") -> list[str]:
    """`argv` wrapped so the process gets `signal` when the runner dies."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # util-linux without setpriv: daemons may outlive a killed run
        return argv
    return [setpriv, "--pdeathsig", signal, *argv]
