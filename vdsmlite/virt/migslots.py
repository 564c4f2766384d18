"""How many live migrations a host runs at once.

Migrations share the host's network and CPU: run all at once (a host put in
maintenance sends every VM away) and each gets a sliver of the bandwidth, takes
long and may never converge. As VDSM, a host sends at most ``[virt]
max_outgoing_migrations`` (2) at once, later ones waiting in turn (`Slots`), and
takes at most ``[virt] max_incoming_migrations`` (2): VM.migrationCreate beyond it
answers 82, and the source tries again after ``[virt] migration_retry_timeout``
(10 s). The engine may change both bounds with each request (VM.migrate's
``outgoingLimit``, VM.migrationCreate's ``incomingLimit``); like VDSM's, a bound it
sets holds for the requests after it too.
"""

from __future__ import annotations

import asyncio


class Slots:
    """At most `bound` holders at once; waiting is given up when `give_up` is set."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.busy = 0
        self._changed = asyncio.Event()  # set (and replaced) when a holder may go on

    def set_bound(self, bound: int) -> None:
        self.bound = bound
        self._wake()

    async def acquire(self, give_up: asyncio.Event) -> bool:
        """Wait for a slot; False if `give_up` was set first (no slot taken)."""
        while self.busy >= self.bound:
            waits = [asyncio.ensure_future(self._changed.wait()),
                     asyncio.ensure_future(give_up.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if give_up.is_set():
                return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1
        self._wake()

    def _wake(self) -> None:
        # Everybody waiting looks again; later waiters wait on a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
