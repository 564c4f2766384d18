"""The jobs/tasks registry: states, progress, errors, events, clearing, shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import run
from vdsmlite import cancel, errors
from vdsmlite import jobs as jobs_module
from vdsmlite.blocking import BlockingExecutor
from vdsmlite.events import DROPPED_EVENT, EventBus
from vdsmlite.jobs import Job, JobRegistry
from vdsmlite.storage import commands

pytestmark = pytest.mark.unit


def test_successful_job_walks_the_states_and_publishes_each() -> None:
    async def main() -> None:
        bus = EventBus()
        seen: list[tuple[str, str]] = []
        bus.add_listener(lambda e: seen.append((e.name, e.params["status"])))
        reg = JobRegistry(bus)
        gate = asyncio.Event()

        async def body(job: Job) -> str:
            job.update(progress=40, bytes_done=4096)
            await gate.wait()
            return "ok"

        job = await reg.start(body, description="copy", verb="Volume.create")
        assert job.task_status()["taskState"] == "init"
        await asyncio.sleep(0)
        assert job.info() == {"id": job.id, "status": "running", "description": "copy",
                              "job_type": "storage", "progress": 40.0, "bytes_done": 4096}
        assert job.task_status() == {"taskID": job.id, "taskState": "running", "taskResult": "",
                                     "code": 0, "message": "running job 1 of 1"}
        gate.set()
        await job.wait()
        assert job.result == "ok"
        assert job.task_status() == {"taskID": job.id, "taskState": "finished",
                                     "taskResult": "success", "code": 0,
                                     "message": "1 jobs completed successfully"}
        assert job.info()["progress"] == 100.0
        name = f"|jobs|status|{job.id}"
        assert seen == [(name, "pending"), (name, "running"), (name, "done")]
        assert job.task_info() == {"id": job.id, "verb": "Volume.create"}
    run(main())


def test_failed_job_reports_the_vdsm_error() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus())

        async def body(job: Job) -> None:
            raise errors.NoSpaceLeftOnDomain("sd")

        job = await reg.start(body, description="create", verb="Volume.create")
        await job.wait()
        assert job.info()["status"] == "failed"
        assert job.info()["error"] == {"code": 397, "message": "No space left on domain: ('sd',)"}
        st = job.task_status()
        assert (st["taskState"], st["taskResult"], st["code"]) == ("finished", "cleanSuccess", 397)
    run(main())


def test_crashed_job_is_a_general_exception() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus())

        async def body(job: Job) -> None:
            raise ZeroDivisionError("oops")

        job = await reg.start(body, description="x", verb="v")
        await job.wait()
        assert job.info()["error"]["code"] == 100
    run(main())


def test_abort_ends_in_aborted_with_411() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus())
        cleaned = asyncio.Event()

        async def body(job: Job) -> None:
            try:
                await asyncio.sleep(60)
            finally:
                cleaned.set()  # rollback code runs on abort

        job = await reg.start(body, description="x", verb="v")
        await asyncio.sleep(0)
        job.abort()
        assert job.info()["status"] == "aborting"
        await job.wait()
        assert cleaned.is_set()
        assert job.info()["status"] == "aborted"
        assert job.task_status()["code"] == 411
    run(main())


def test_clear_and_lookup() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus())
        gate = asyncio.Event()

        async def body(job: Job) -> None:
            await gate.wait()

        job = await reg.start(body, description="x", verb="v")
        with pytest.raises(errors.TaskNotFinished):
            await reg.clear(job.id)
        gate.set()
        await job.wait()
        await reg.clear(job.id)
        with pytest.raises(errors.UnknownTask):
            reg.get(job.id)
        with pytest.raises(errors.UnknownTask):
            await reg.clear(job.id)
    run(main())


def test_a_cleared_job_is_freed_without_the_garbage_collector() -> None:
    # No reference cycle through the job's cancel token: a job goes when the registry
    # forgets it, not at the next full collection (which walks everything kept).
    async def main() -> None:
        reg = JobRegistry(EventBus())

        async def body(job: Job) -> None:
            await asyncio.to_thread(cancel.report_bytes, 512)

        job = await reg.start(body, description="x", verb="v")
        await job.wait()
        assert job.bytes_done == 512  # the token still reports to its job
        gone = weakref.ref(job)
        await reg.clear(job.id)
        del job
        assert gone() is None

    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()


def test_filters_and_duplicate_ids() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus())

        async def body(job: Job) -> None:
            return None

        a = await reg.start(body, description="a", verb="v",
                      job_id="0b7c2f0e-2d1a-4a55-9d8b-1c2e3f4a5b6c")
        b = await reg.start(body, description="b", verb="v", job_type="v2v")
        with pytest.raises(errors.JobExists):
            await reg.start(body, description="a", verb="v", job_id=a.id)
        assert {j.id for j in reg.jobs("v2v")} == {b.id}
        assert {j.id for j in reg.jobs(job_ids=[a.id, "nope"])} == {a.id}
        await asyncio.gather(a.wait(), b.wait())
        assert reg.count_by_status()["done"] == 2
    run(main())


def test_finished_jobs_expire() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus(), autodelete_delay=0.05)

        async def body(job: Job) -> None:
            return None

        job = await reg.start(body, description="x", verb="v")
        await job.wait()
        assert reg.jobs() == [job]
        await asyncio.sleep(0.1)
        assert reg.jobs() == []
    run(main())


def test_close_waits_then_aborts() -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus())

        async def quick(job: Job) -> None:
            await asyncio.sleep(0.05)

        async def forever(job: Job) -> None:
            await asyncio.sleep(3600)

        a = await reg.start(quick, description="quick", verb="v")
        b = await reg.start(forever, description="forever", verb="v")
        await reg.close(grace=0.3)
        assert a.info()["status"] == "done"
        assert b.info()["status"] == "aborted"
        with pytest.raises(errors.ShuttingDownError):
            await reg.start(quick, description="late", verb="v")
    run(main())


def test_slow_subscriber_drops_and_is_told() -> None:
    async def main() -> None:
        bus = EventBus(queue_size=3)
        with bus.subscribe() as sub:
            for i in range(10):
                bus.publish("e", {"i": i})
            got = [await sub.get() for _ in range(4)]
            assert [e.params.get("i") for e in got[:3]] == [0, 1, 2]
            assert got[3].name == DROPPED_EVENT and got[3].params["count"] == 7
            assert bus.dropped_total == 7
            bus.publish("e", {"i": 99})
            assert (await sub.get()).params["i"] == 99
        assert bus.subscriber_count == 0
    run(main())


def test_abort_waits_for_the_blocking_work_and_reaches_it() -> None:
    """The job ends only after its thread stopped; the thread saw the stop (a flag it
    checks, a child command terminated) and its lock is released after that."""
    async def main() -> None:
        executor = BlockingExecutor(2)
        reg = JobRegistry(EventBus())
        lock = asyncio.Lock()
        started = threading.Event()
        seen: list[str] = []

        def work() -> None:
            started.set()
            try:
                while True:
                    cancel.check()
                    time.sleep(0.01)
            except cancel.Cancelled:
                seen.append("flag")
            try:
                commands.run(["sleep", "60"])
            except cancel.Cancelled:
                seen.append("command")
            time.sleep(0.2)  # rollback after the stop: the job must wait for it
            seen.append("thread done")

        async def body(job: Job) -> None:
            async with lock:
                try:
                    await executor.run(work)
                finally:
                    seen.append("lock released")

        job = await reg.start(body, description="zero", verb="Volume.delete")
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        job.abort()
        await job.wait()
        assert job.info()["status"] == "aborted"
        assert job.task_status()["code"] == 411
        # A command started after the stop is refused; the lock goes after the thread.
        assert seen == ["flag", "command", "thread done", "lock released"]
        executor.shutdown()
    run(main())


def test_a_running_command_is_terminated_by_the_stop() -> None:
    token = cancel.CancelToken()
    threading.Timer(0.2, token.cancel).start()
    cancel.set_current(token)
    try:
        start = time.monotonic()
        with pytest.raises(cancel.Cancelled):
            commands.run(["sleep", "60"])
        assert time.monotonic() - start < 30
    finally:
        cancel.set_current(None)


def test_tasks_survive_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        reg = JobRegistry(EventBus(), state_dir=tmp_path)
        gate = asyncio.Event()

        async def ok(job: Job) -> None:
            pass

        async def fails(job: Job) -> None:
            raise errors.NoSpaceLeftOnDomain("sd")

        async def hangs(job: Job) -> None:
            await gate.wait()

        async def host_job(job: Job) -> None:
            pass

        done = await reg.start(ok, description="a", verb="Volume.create")
        failed = await reg.start(fails, description="b", verb="Volume.create")
        running = await reg.start(hangs, description="c", verb="Volume.delete")
        cleared = await reg.start(ok, description="d", verb="Volume.create")
        private = await reg.start(host_job, description="e", verb="SDM.merge", job_id="j1",
                            persist=False)
        for j in (done, failed, cleared, private):
            await j.wait()
        await reg.clear(cleared.id)
        await asyncio.sleep(0)
        # The agent dies here (no close): what the next start finds.
        again = JobRegistry(EventBus(), state_dir=tmp_path)
        assert again.get(done.id).task_status()["taskResult"] == "success"
        assert again.get(failed.id).task_status() == failed.task_status()
        st = again.get(running.id).task_status()
        assert (st["taskState"], st["taskResult"], st["code"]) == \
            ("finished", "cleanSuccess", 411)
        assert "restart" in st["message"]
        assert again.get(running.id).task_info() == {"id": running.id, "verb": "Volume.delete"}
        for gone in (cleared.id, private.id):
            with pytest.raises(errors.UnknownTask):
                again.get(gone)
        await again.clear(done.id)
        assert JobRegistry(EventBus(), state_dir=tmp_path).find(done.id) is None
        gate.set()
        await running.wait()
    run(main())


def test_a_stalled_record_write_holds_the_loop_nowhere_and_hides_an_unrecorded_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A task's record is fsynced; under heavy I/O that can take long. The real writes,
    # each held until the test lets it go: meanwhile the loop runs on, `start` has not
    # returned (the id is not on disk yet), and an ended job does not look ended.
    real_write = jobs_module._write_record
    release = threading.Semaphore(0)
    writing: list[str] = []

    def held_write(job_id: str, path: Path, text: str) -> None:
        writing.append(json.loads(text)["status"])
        assert release.acquire(timeout=30)
        real_write(job_id, path, text)

    monkeypatch.setattr(jobs_module, "_write_record", held_write)

    async def main() -> None:
        reg = JobRegistry(EventBus(), state_dir=tmp_path)

        async def quick(job: Job) -> str:
            return "made"

        starting = asyncio.ensure_future(reg.start(quick, description="q", verb="v"))

        async def until(cond: Callable[[], bool]) -> None:
            for _ in range(3000):  # the loop is not held by the write meanwhile
                if cond():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("timed out")

        await until(lambda: bool(writing) and bool(reg.jobs()) and
                    reg.jobs()[0].result == "made")  # the body is done too
        (job,) = reg.jobs()
        assert not starting.done() and writing == ["pending"]
        record = tmp_path / "tasks" / f"{job.id}.json"
        assert not record.exists()
        release.release()  # the start record is written
        assert await asyncio.wait_for(starting, 30) is job
        assert json.loads(record.read_text())["status"] == "pending"
        await until(lambda: len(writing) == 2)  # then its end, held in turn
        assert writing[1] == "done"
        assert job.status == "running" and not job.status.finished  # its end not on disk
        release.release()
        await asyncio.wait_for(job.wait(), 30)
        assert job.status == "done"
        assert json.loads(record.read_text())["status"] == "done"
        await reg.close(1.0)
    run(main())


def test_a_job_stopped_before_its_first_step_ends_aborted_at_shutdown(tmp_path: Path) -> None:
    # Aborted in the turn of the loop that launched it (as the shutdown's abort can):
    # its task is cancelled before `_run` ran a line. Closing the registry still ends
    # it, aborted, for its waiters (an index build's) and in its record.
    async def main() -> None:
        reg = JobRegistry(EventBus(), state_dir=tmp_path)
        ran: list[str] = []

        async def body(job: Job) -> None:
            ran.append(job.id)

        job = reg.launch(body, description="never", verb="v")
        job.abort()
        await asyncio.wait_for(reg.close(0.1), 30)
        await asyncio.wait_for(job.wait(), 5)
        assert ran == [] and job.status == "aborted"
        assert job.task_status()["code"] == errors.TaskAborted.code
        record = json.loads((tmp_path / "tasks" / f"{job.id}.json").read_text())
        assert record["status"] == "aborted"
    run(main())
