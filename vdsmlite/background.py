"""Tasks that outlive the call that starts them.

A task created with `asyncio.create_task` runs in a copy of its creator's
context. For a task that serves the daemon rather than one call - a domain
monitor, a lease holder's watcher, the fence service's loops, a VM's exit
watcher - that copy carries the creating call's request id and, when a job
started it, the job's `cancel.CancelToken`: every line the task logs for as long
as it lives says ``[req=<that call>]``, and stopping that job would stop the
blocking work the task does through the executor (which carries the token into
its threads). `spawn` starts such a task in a fresh context instead.

Work that belongs to the call (a job's body, a request's own subtasks, a
migration the call started) keeps using `asyncio.create_task`.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
    """Run `coro` as a task of the daemon's own: no request id, no job's cancel token."""
    return asyncio.get_running_loop().create_task(coro, name=name,
                                                  context=contextvars.Context())
