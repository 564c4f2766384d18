"""Task.* verbs: the engine's polling view of long-running jobs."""

from __future__ import annotations

from typing import Any

from vdsmlite.api.base import verb
from vdsmlite.jobs import JobRegistry


class TaskApi:
    def __init__(self, jobs: JobRegistry) -> None:
        self._jobs = jobs

    @verb("Task.getStatus")
    async def get_status(self, *, taskID: str) -> dict[str, Any]:
        return self._jobs.get(taskID).task_status()

    @verb("Task.getInfo")
    async def get_info(self, *, taskID: str) -> dict[str, Any]:
        return self._jobs.get(taskID).task_info()

    @verb("Task.clear")
    async def clear(self, *, taskID: str) -> bool:
        await self._jobs.clear(taskID)
        return True

    @verb("Task.stop")
    async def stop(self, *, taskID: str) -> bool:
        self._jobs.get(taskID).abort()
        return True
