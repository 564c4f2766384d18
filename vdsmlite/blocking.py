"""Blocking work off the event loop: the one executor and the callable that uses it.

Services that must block (LVM, fsync, O_DIRECT I/O, sanlock calls) receive a
`RunBlocking` rather than an executor, so tests can hand them any coroutine
function and the code reads as "run this blocking call" at every call site.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

RunBlocking = Callable[..., Awaitable[Any]]


class BlockingExecutor:
    """A bounded thread pool whose calls keep the caller's context (the request id
    in log lines) and never run on the event loop."""

    def __init__(self, max_workers: int, name: str = "vdsmlite-io") -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in a worker thread.

        If the caller is cancelled, it still waits for the thread to return before
        CancelledError goes on: the caller's locks and leases are never released
        while the thread still works under them. Work of a job stops early because
        the job's `cancel.CancelToken`, carried here in the context, was cancelled
        with it (`Job.abort`); other work runs to its end.
        """
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await until_done(loop.run_in_executor(self._pool, call))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


async def until_done(fut: asyncio.Future[T], *,
                     on_cancel: Callable[[], None] | None = None) -> T:
    """Await `fut`, the result of work in a thread. If the caller is cancelled, the
    work is not: `on_cancel` (if given) asks it to stop, and the caller waits for
    it to end before its CancelledError goes on, whatever else cancels it meanwhile
    - so nothing the thread uses is released under it."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: the caller's CancelledError wins
        raise

