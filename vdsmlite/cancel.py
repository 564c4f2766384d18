"""Stopping blocking work: a flag the work checks, and the child processes it runs.

Cancelling a coroutine does not stop the executor thread it waits for: the
thread keeps writing while the caller, believing it stopped, releases the image
lock and the SDM lease. So a stop reaches the work itself:

* every job has a `CancelToken`, carried in a context variable into the executor
  threads that run its work;
* blocking loops call `check()` between chunks and raise `Cancelled`;
* commands run by `storage.commands.run` are registered with the token; a stop
  sends their process group SIGTERM (LVM defers it past its critical sections),
  then SIGKILL after `KILL_GRACE` seconds;
* rollback code runs under `shielded()`, where nothing is cancelled, so it can
  still run `lvremove` after the stop;
* the executor's caller waits until the thread has returned before it goes on
  (`blocking.BlockingExecutor.run`), so locks are released only after the work
  and its rollback ended.

`Cancelled` derives from BaseException, as asyncio's CancelledError does, so the
``except Exception`` / ``except OSError`` wrappers of storage code never turn a
stop into an ordinary failure.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("vdsmlite.cancel")

KILL_GRACE = 10.0


class Cancelled(BaseException):
    """The work was asked to stop; raised from blocking code at a safe point."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[bytes]] = set()
        # Bytes moved so far, for the job that owns the token (set by the job).
        self.on_bytes: Callable[[int], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def cancel(self) -> None:
        """Ask the work to stop; returns at once (safe from any thread)."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            procs = list(self._procs)
        for proc in procs:
            _terminate(proc)

    @contextlib.contextmanager
    def child_process(self, proc: subprocess.Popen[bytes]) -> Iterator[None]:
        """Terminate `proc` (its process group) if the token is cancelled while it runs."""
        with self._lock:
            self._procs.add(proc)
            cancelled = self._event.is_set()
        if cancelled:
            _terminate(proc)
        try:
            yield
        finally:
            with self._lock:
                self._procs.discard(proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    log.info("stopping %s (pid %d): its task was stopped", proc.args, proc.pid)
    _signal_group(proc, signal.SIGTERM)
    timer = threading.Timer(KILL_GRACE, _signal_group, (proc, signal.SIGKILL))
    timer.daemon = True
    timer.start()


_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "vdsmlite_cancel", default=None)


def current() -> CancelToken | None:
    return _current.get()


def set_current(token: CancelToken | None) -> contextvars.Token[CancelToken | None]:
    return _current.set(token)


def check() -> None:
    """Raise `Cancelled` if the work running in this context was asked to stop."""
    token = _current.get()
    if token is not None:
        token.check()


def report_bytes(done: int) -> None:
    """Tell the job running this work how many bytes it has moved so far."""
    token = _current.get()
    if token is not None and token.on_bytes is not None:
        token.on_bytes(done)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Run the block as if nothing was cancelled: rollback after a stop."""
    reset = _current.set(None)
    try:
        yield
    finally:
        _current.reset(reset)
