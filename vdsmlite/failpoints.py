"""Named crash points for crash-consistency tests.

``VDSMLITE_FAILPOINTS=volume.create.after_data,...`` in the daemon's
environment makes the process SIGKILL itself when execution reaches that
point: a real, abrupt death at a chosen step (no cleanup, no finally blocks),
so tests can prove the next start finds storage in a state it recovers from.
Read once at import; unset in production, where `hit` is one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("vdsmlite.failpoints")

_ARMED = frozenset(p.strip() for p in os.environ.get("VDSMLITE_FAILPOINTS", "").split(",")
                   if p.strip())


def hit(name: str) -> None:
    if name in _ARMED:
        log.warning("failpoint %s: killing the daemon", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
