"""A worker killed mid-task loses nothing: another worker finishes it (docs/design.md#redelivery)."""

import asyncio
import signal

from guillotina import task_vars

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import all_empty, error_queue_count, lines, wait_for

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


async def test_a_task_that_kills_every_worker_it_runs_on_ends_in_the_error_queue(guillotina_main, tmp_path):
    """A run whose worker died counts as a crash; past max_task_retries crashes the task is not
    run again but errored into the error queue: a task that kills its worker never loops."""
    for var in (task_vars.request, task_vars.container, task_vars.db):
        var.set(None)
    marker = tmp_path / "runs"
    config = worker_config(lock_ttl=LOCK_TTL, max_task_retries=1)
    state = await add_task(app.exit_worker, str(marker))
    for _ in range(2):  # the first run, and one more after its worker died
        async with WorkerProcess(config) as doomed:
            assert await doomed.wait_exit(90) == 1, doomed.output

    async with WorkerProcess(config) as last:
        final = await asyncio.wait_for(state.join(), 90)
        await wait_for(lambda: _one_dead_letter(), what="the task in the error queue")
        assert last.returncode is None, last.output  # it did not run the task

    assert (final["status"], final["crashes"]) == (TaskStatus.ERRORED, 2), final
    assert "died" in final["error"] and final.get("job_retries", 0) == 0
    assert lines(marker) == ["started", "started"]  # never a third time


async def _one_dead_letter() -> bool:
    return await error_queue_count() == 1
