"""A worker killed mid-task loses nothing: another worker finishes it (docs/design.md#redelivery)."""

import asyncio
import signal

from guillotina import task_vars

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import all_empty, lines, wait_for

#: the dead worker's lock outlives it by at most this (seconds): the retry must wait it out
LOCK_TTL = 2


async def test_killed_worker_task_is_redelivered_and_finished_by_another(guillotina_main, tmp_path):
    for var in (task_vars.request, task_vars.container, task_vars.db):
        var.set(None)
    marker = tmp_path / "runs"
    async with WorkerProcess(worker_config(lock_ttl=LOCK_TTL)) as doomed:
        await doomed.wait_consuming()
        state = await add_task(app.sleep_then_mark, str(marker), 3)
        await wait_for(lambda: lines(marker) == ["started"], what="the task to start on the doomed worker")
        assert await state.get_status() == TaskStatus.RUNNING

        async with WorkerProcess(worker_config(lock_ttl=LOCK_TTL)) as survivor:
            await survivor.wait_consuming()
            doomed.kill()
            assert await doomed.wait_exit() == -signal.SIGKILL

            final = await asyncio.wait_for(state.join(), 60)
            await wait_for(all_empty, what="every queue to be empty")

    assert final["status"] == TaskStatus.FINISHED, (final, survivor.output)
    assert final["result"] == "done"
    assert lines(marker) == ["started", "started", "done"]  # run again from the start, finished once
    assert final.get("job_retries", 0) == 0  # a crash is not a task failure


async def test_killed_worker_loses_none_of_its_prefetched_tasks(guillotina_main, tmp_path):
    for var in (task_vars.request, task_vars.container, task_vars.db):
        var.set(None)
    marker = tmp_path / "runs"
    async with WorkerProcess(worker_config(lock_ttl=LOCK_TTL), "--max-running-tasks", "2") as doomed:
        await doomed.wait_consuming()
        # two run, the others wait unacked in the doomed worker's prefetch window or the queue
        states = [await add_task(app.sleep_then_mark, str(marker), 2) for _ in range(6)]
        await wait_for(lambda: lines(marker).count("started") == 2, what="two tasks to start")
        doomed.kill()
        assert await doomed.wait_exit() == -signal.SIGKILL

    async with WorkerProcess(worker_config(lock_ttl=LOCK_TTL)) as survivor:
        await survivor.wait_consuming()
        finals = await asyncio.wait_for(asyncio.gather(*(state.join() for state in states)), 90)
        await wait_for(all_empty, what="every queue to be empty")

    assert [f["status"] for f in finals] == [TaskStatus.FINISHED] * 6, survivor.output
    assert lines(marker).count("done") == 6
