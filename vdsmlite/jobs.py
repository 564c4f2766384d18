"""The registry of long-running work: jobs, seen by VDSM clients as jobs and tasks.

VDSM has two vocabularies for the same idea: SPM *tasks* (a verb returns a
task id, the engine polls `Task.getStatus` and then `Task.clear`s it) and host
*jobs* (`Host.getJobs`, ``|jobs|status|<id>`` events). vdsmlite runs every long
operation as one `Job` and answers both vocabularies from it, so an upload
started over HTTP is visible in `Host.getJobs` and pollable by its `Task-Id`.

A job's body is a coroutine that receives the `Job` and reports progress
through it. Status changes are published on the event bus. Finished jobs are
kept until cleared, or for `autodelete_delay` seconds (VDSM's 3600) so a
client that never clears cannot grow the registry forever.

A stop (`Job.abort`: Task.stop, or the abort at shutdown) reaches the work:
the job's `cancel.CancelToken` is cancelled, which the blocking code checks
between chunks and which terminates the command it runs; the body rolls back
what it made and only then do its locks go and the job report aborted (411).

Tasks survive a restart as VDSM's SPM tasks do: with a state directory, each
task's id and state are kept in ``<state_dir>/tasks/<id>.json`` (written
durably at start and when it ends, removed by Task.clear or expiry), so an
engine polling a task after a restart gets its final state. The records are
written by a thread of the registry's own, in order, never on the event loop
(an fsync can take tens of milliseconds under I/O, and the whole daemon would
wait): `start` returns once the task's record is on disk, and a task's end is
seen (status, events, waiters) only once its record says so. A task that was
still running when the agent died is reported aborted (411): the work itself
is not resumed; storage operations are written so that an interrupted one is
found and repaired from what is on disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import json
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vdsmlite import blocking, cancel, errors
from vdsmlite.events import EventBus
from vdsmlite.fsutil import fsync_dir, write_file_durably

log = logging.getLogger("vdsmlite.jobs")


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    ABORTING = "aborting"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.ABORTED, JobStatus.FAILED)


# VDSM task states for each job status (Task.getStatus).
_TASK_STATE = {
    JobStatus.PENDING: "init",
    JobStatus.RUNNING: "running",
    JobStatus.ABORTING: "aborting",
    JobStatus.DONE: "finished",
    JobStatus.ABORTED: "finished",
    JobStatus.FAILED: "finished",
}

JobBody = Callable[["Job"], Awaitable[Any]]


class RecordedError(errors.VdsmError):
    """A task's error as recorded before a restart: its code and message, verbatim."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self._code = code
        self._message = message

    @property
    def message(self) -> str:
        return self._message

    def to_json(self) -> dict[str, Any]:
        return {"code": self._code, "message": self._message}


def _bytes_reporter(job: weakref.ref[Job]) -> Callable[[int], None]:
    """The token's way back to its job, by a weak reference: the job holds the token,
    so a strong one would put every job in a reference cycle, freed only by the
    garbage collector's full passes instead of when the registry forgets it."""
    def report(done: int) -> None:
        alive = job()
        if alive is not None:
            alive.update(bytes_done=done)
    return report


class Job:
    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        description: str,
        job_type: str,
        verb: str,
        *,
        persist: bool = False,
    ) -> None:
        self._registry = registry
        self.persist = persist
        self.id = job_id
        self.description = description
        self.job_type = job_type
        self.verb = verb
        self.status = JobStatus.PENDING
        self.progress: float | None = None
        self.bytes_done: int | None = None
        self.error: errors.VdsmError | None = None
        self.result: Any = None
        self.created = time.monotonic()
        self.finished_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._recorded: concurrent.futures.Future[None] | None = None  # see `recorded`
        # Cancelled by abort(); the blocking work checks it (see vdsmlite.cancel).
        self.cancel_token = cancel.CancelToken()
        self.cancel_token.on_bytes = _bytes_reporter(weakref.ref(self))

    # --- called by the job body -------------------------------------------

    def update(self, *, progress: float | None = None, bytes_done: int | None = None) -> None:
        """Report progress (percent) and/or bytes moved. Cheap; no event is sent."""
        if progress is not None:
            self.progress = round(min(max(progress, 0.0), 100.0), 2)
        if bytes_done is not None:
            self.bytes_done = bytes_done

    # --- views ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Host.getJobs shape."""
        out: dict[str, Any] = {
            "id": self.id,
            "status": str(self.status),
            "description": self.description,
            "job_type": self.job_type,
        }
        if self.progress is not None:
            out["progress"] = self.progress
        if self.bytes_done is not None:
            out["bytes_done"] = self.bytes_done
        if self.error is not None:
            out["error"] = self.error.to_json()
        return out

    def task_status(self) -> dict[str, Any]:
        """Task.getStatus shape."""
        if self.status == JobStatus.DONE:
            result, code, message = "success", 0, "1 jobs completed successfully"
        elif self.status.finished:
            # VDSM reports a failed task whose rollback completed as cleanSuccess.
            assert self.error is not None
            err = self.error.to_json()
            result, code, message = "cleanSuccess", err["code"], err["message"]
        else:
            result, code, message = "", 0, "running job 1 of 1"
        return {
            "taskID": self.id,
            "taskState": _TASK_STATE[self.status],
            "taskResult": result,
            "code": code,
            "message": message,
        }

    def task_info(self) -> dict[str, Any]:
        return {"id": self.id, "verb": self.verb}

    async def wait(self) -> None:
        await self._done.wait()

    async def recorded(self) -> None:
        """Until the job's record is on disk (at once if it keeps none): before its id
        goes to a client, so that a restart cannot lose it."""
        if self._recorded is not None:
            await blocking.until_done(asyncio.wrap_future(self._recorded))

    def abort(self) -> None:
        """Stop the job: its blocking work stops at its next check (its command is
        terminated), rolls back, and only then the job releases its locks and ends
        aborted. Returns at once; `wait` for the end."""
        if self.status.finished or self._task is None:
            return
        self._set_status(JobStatus.ABORTING)
        self.cancel_token.cancel()
        self._task.cancel()

    # --- lifecycle (registry only) ---------------------------------------------

    def _set_status(self, status: JobStatus) -> None:
        if status == self.status:
            return
        self.status = status
        if status.finished:
            self.finished_at = time.monotonic()
            self._done.set()
        self._registry._status_changed(self)

    async def _run(self, body: JobBody) -> None:
        self._set_status(JobStatus.RUNNING)
        cancel.set_current(self.cancel_token)  # this task's context: seen by its threads
        try:
            self.result = await body(self)
        except (asyncio.CancelledError, cancel.Cancelled):
            self.error = errors.TaskAborted(self.id)
            end = JobStatus.ABORTED
            log.info("job %s (%s) aborted", self.id, self.description)
            # Swallow: an aborted job is a normal outcome, not a crashed task.
        except errors.VdsmError as e:
            self.error = e
            end = JobStatus.FAILED
            log.warning("job %s (%s) failed: %s", self.id, self.description, e)
        except Exception as e:
            log.exception("job %s (%s) crashed", self.id, self.description)
            self.error = errors.GeneralException(str(e))
            end = JobStatus.FAILED
        else:
            self.progress = 100.0
            end = JobStatus.DONE
            log.info("job %s (%s) done", self.id, self.description)
        await self._registry._end(self, end)


class JobRegistry:
    def __init__(self, events: EventBus, *, autodelete_delay: float = 3600.0,
                 state_dir: Path | None = None) -> None:
        self._events = events
        self._jobs: dict[str, Job] = {}
        self.autodelete_delay = autodelete_delay
        self._closed = False
        self._dir = state_dir / "tasks" if state_dir is not None else None
        # One thread: a task's records are written in the order they were made.
        self._records = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="vdsmlite-records")
        if self._dir is not None:
            self._load()

    # --- persisted tasks ---------------------------------------------------------

    def _record_path(self, job_id: str) -> Path | None:
        if self._dir is None:
            return None
        return self._dir / f"{job_id}.json"

    def _record(self, job: Job, status: JobStatus) -> concurrent.futures.Future[None] | None:
        """Write the job's record, as it is now but with `status`, in the records'
        thread; None if the job keeps none."""
        path = self._record_path(job.id)
        if path is None or not job.persist:
            return None
        rec: dict[str, Any] = {"id": job.id, "verb": job.verb,
                               "description": job.description, "job_type": job.job_type,
                               "status": str(status), "time": time.time()}
        if job.error is not None:
            rec["error"] = job.error.to_json()
        return self._records.submit(_write_record, job.id, path, json.dumps(rec))

    async def _end(self, job: Job, status: JobStatus) -> None:
        """End the job once its record says so: a restart keeps what any client saw.
        Not cancellable: the job's task ends here whatever stops it meanwhile."""
        written = self._record(job, status)
        if written is not None:
            waiting = asyncio.wrap_future(written)
            while not waiting.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([waiting])
        job._set_status(status)

    def _forget(self, job: Job) -> concurrent.futures.Future[None] | None:
        """Remove the job's record in the records' thread; None if it keeps none."""
        path = self._record_path(job.id)
        if path is None or not job.persist:
            return None
        return self._records.submit(_remove_record, path)

    def _load(self) -> None:
        """The tasks of the previous run: finished ones as they ended; one still
        running when the agent stopped is reported aborted (its work is not resumed)."""
        assert self._dir is not None
        if not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                job_id = str(rec["id"])
                status = JobStatus(rec["status"])
                job = Job(self, job_id, str(rec.get("description", "")),
                          str(rec.get("job_type", "storage")), str(rec.get("verb", "")),
                          persist=True)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable task record %s: %s", path, e)
                continue
            if status.finished:
                err = rec.get("error")
                if isinstance(err, dict):
                    job.error = RecordedError(int(err.get("code", 100)),
                                              str(err.get("message", "")))
                if status == JobStatus.DONE:
                    job.progress = 100.0
            else:
                status = JobStatus.ABORTED
                job.error = RecordedError(
                    errors.TaskAborted.code,
                    f"{errors.TaskAborted.msg}: ('{job_id}',): interrupted by an agent "
                    "restart; storage left by it is repaired on disk")
            job.status = status
            job.finished_at = time.monotonic()
            job._done.set()
            self._jobs[job_id] = job
            if not status.finished or rec["status"] != str(status):
                written = self._record(job, status)
                if written is not None:
                    written.result()  # at start-up, before any client
            log.info("task %s (%s) from before the restart: %s", job_id, job.description,
                     status)

    async def start(
        self,
        body: JobBody,
        *,
        description: str,
        verb: str,
        job_type: str = "storage",
        job_id: str | None = None,
        persist: bool = True,
    ) -> Job:
        """`launch`, returning once the job's record is on disk: for a job whose id a
        client gets."""
        job = self.launch(body, description=description, verb=verb, job_type=job_type,
                          job_id=job_id, persist=persist)
        await job.recorded()
        return job

    def launch(
        self,
        body: JobBody,
        *,
        description: str,
        verb: str,
        job_type: str = "storage",
        job_id: str | None = None,
        persist: bool = True,
    ) -> Job:
        """Start `body` as a job now; returns at once, its record being written (see
        `Job.recorded`). Must run on the event loop.

        `persist`: an SPM-style task whose id and final state outlive a restart (see
        the module doc); host jobs with an id the engine chose pass False."""
        if self._closed:
            raise errors.ShuttingDownError()
        self._expire()
        if job_id is None:
            job_id = str(uuid.uuid4())
        elif job_id in self._jobs:
            raise errors.JobExists(job_id)
        job = Job(self, job_id, description, job_type, verb, persist=persist)
        self._jobs[job_id] = job
        # Queued before anything the job writes itself: its end is recorded after it.
        job._recorded = self._record(job, job.status)
        self._status_changed(job)
        job._task = asyncio.create_task(job._run(body), name=f"job-{job_id}")
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise errors.UnknownTask(job_id) from None

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, job_type: str | None = None, job_ids: list[str] | None = None) -> list[Job]:
        self._expire()
        found = list(self._jobs.values())
        if job_type is not None:
            found = [j for j in found if j.job_type == job_type]
        if job_ids:
            wanted = set(job_ids)
            found = [j for j in found if j.id in wanted]
        return found

    async def clear(self, job_id: str) -> None:
        """Forget a finished job; returns once its record is gone from the disk."""
        job = self.get(job_id)
        if not job.status.finished:
            raise errors.TaskNotFinished(job_id)
        del self._jobs[job_id]
        removed = self._forget(job)
        if removed is not None:
            await blocking.until_done(asyncio.wrap_future(removed))

    def count_by_status(self) -> dict[str, int]:
        counts = {str(s): 0 for s in JobStatus}
        for job in self._jobs.values():
            counts[str(job.status)] += 1
        return counts

    async def close(self, grace: float) -> None:
        """Stop accepting jobs; give running ones `grace` seconds, then abort them;
        then wait for the records still being written."""
        self._closed = True
        await self._stop_jobs(grace)
        await asyncio.get_running_loop().run_in_executor(None, self._records.shutdown)

    async def _stop_jobs(self, grace: float) -> None:
        running = [j for j in self._jobs.values() if not j.status.finished]
        if not running:
            return
        log.info("waiting up to %.1fs for %d running job(s)", grace, len(running))
        _, pending = await asyncio.wait([asyncio.ensure_future(j.wait()) for j in running],
                                        timeout=grace)
        for fut in pending:
            fut.cancel()
        for job in running:
            job.abort()
        tasks = [j._task for j in running if j._task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for job in running:
            if not job.status.finished:
                # Cancelled before its task took its first step: `_run` never ran, and
                # nothing else would end it (its waiters would wait forever).
                job.error = errors.TaskAborted(job.id)
                await self._end(job, JobStatus.ABORTED)

    def _status_changed(self, job: Job) -> None:
        self._events.publish(f"|jobs|status|{job.id}", job.info())

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and now - job.finished_at > self.autodelete_delay:
                del self._jobs[job_id]
                self._forget(job)


def _write_record(job_id: str, path: Path, text: str) -> None:
    try:
        write_file_durably(path, text)
    except OSError as e:
        log.error("cannot record task %s in %s: %s", job_id, path, e)


def _remove_record(path: Path) -> None:
    try:
        path.unlink()
        fsync_dir(path.parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("cannot remove the task record %s: %s", path, e)
