"""Two worker processes on one queue: each task runs exactly once, and both share the work."""

import asyncio
import collections

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config


async def test_two_workers_run_each_of_100_tasks_exactly_once(guillotina_main, tmp_path):
    marker = tmp_path / "runs.txt"
    async with WorkerProcess(worker_config()) as first, WorkerProcess(worker_config()) as second:
        await first.wait_consuming()
        await second.wait_consuming()
        # both consume before anything is queued, so the broker hands tasks to both
        states = await asyncio.gather(*(add_task(app.mark_pid, str(marker), f"task-{i}") for i in range(100)))
        finals = [await state.join() for state in states]

    assert [final["status"] for final in finals] == [TaskStatus.FINISHED] * 100
    runs = [line.split() for line in marker.read_text().splitlines()]
    per_task = collections.Counter(label for label, _ in runs)
    assert per_task == {f"task-{i}": 1 for i in range(100)}
    pids = {pid for _, pid in runs}
    assert pids == {str(first.process.pid), str(second.process.pid)}
