"""Blocking work off the event loop: the one executor and the callable that uses it.

Services that must block (LVM, fsync, O_DIRECT I/O, sanlock calls) receive a
`RunBlocking` rather than an executor, so tests can hand them any coroutine
function and the code reads as "run this blocking call" at every call site.
"""

from __future__ import annotations

import asyncio
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

    def __init__(self, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="vdsmlite-io")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
