"""Named crash points for crash-consistency tests.

``VDSMLITE_FAILPOINTS=volume.create.after_data,...`` in the daemon's
environment makes the process SIGKILL itself when execution reaches that
point: a real, abrupt death at a chosen step (no cleanup, no finally blocks),
so tests can prove the next start finds storage in a state it recovers from.
Read once at import; unset in production, where `hit` is one set lookup.

``name:pause`` instead makes that step take long: execution waits there until
its task is stopped (`vdsmlite.cancel`), then goes on as the stop requires - so a
test can stop a create in the middle of a step that is otherwise too quick to hit.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from vdsmlite import cancel

log = logging.getLogger("vdsmlite.failpoints")

_SPECS = [p.strip() for p in os.environ.get("VDSMLITE_FAILPOINTS", "").split(",") if p.strip()]
_ARMED = frozenset(p for p in _SPECS if not p.endswith(":pause"))
_PAUSED = frozenset(p.removesuffix(":pause") for p in _SPECS if p.endswith(":pause"))
PAUSE_LIMIT = 300.0


def hit(name: str) -> None:
    if name in _PAUSED:
        log.warning("failpoint %s: pausing until the task is stopped", name)
        deadline = time.monotonic() + PAUSE_LIMIT
        while time.monotonic() < deadline:
            cancel.check()
            time.sleep(0.05)
        return
    if name in _ARMED:
        log.warning("failpoint %s: killing the daemon", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
