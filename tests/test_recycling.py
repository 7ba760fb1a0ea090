"""Worker recycling and load (docs/operations.md): --max-tasks, --max-run-time, --max-load."""

from collections import Counter

import pytest

from guillotina_amqp import add_task, recycling
from guillotina_amqp.liveness import EXIT_OK
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import lines, logged, queue_counts, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


async def ready() -> int:
    """Messages ready in the main queue."""
    return list((await queue_counts()).values())[0]


async def test_max_tasks_claims_that_many_gives_back_the_rest_and_exits_0(guillotina_main, tmp_path):
    marks = tmp_path / "runs"
    # Given 8 tasks waiting, and a worker that prefetches 5 but may claim only 3
    states = [await add_task(app.sleep_then_mark_pid, str(marks), 0.3) for _ in range(8)]
    async with WorkerProcess(worker_config(max_running_tasks=5), "--max-tasks", "3") as first:
        # Then it runs 3 of them, exits 0, and the other 5 wait in the queue, never started
        assert await first.wait_exit(60) == EXIT_OK
    assert "ran its 3 tasks (--max-tasks): recycling" in first.output
    by_first = Counter(line.split()[0] for line in lines(marks))
    assert by_first == {"started": 3, "done": 3}
    assert await ready() == 5

    # And a fresh worker runs the rest: every task ran exactly once
    async with WorkerProcess(worker_config()):
        finals = [await state.join(wait=0.1) for state in states]
    assert [final["status"] for final in finals] == [TaskStatus.FINISHED] * 8
    assert Counter(line.split()[0] for line in lines(marks)) == {"started": 8, "done": 8}


async def test_max_run_time_finishes_the_running_task_then_exits_0(guillotina_main, tmp_path):
    go = tmp_path / "go"
    state = await add_task(app.wait_then_log, str(go))
    async with WorkerProcess(worker_config(), "--max-run-time", "2") as worker:
        await wait_for(lambda: _is_running(state), 60, "the task to start")
        # When its run time is over, then it waits for the running task before it exits 0
        await wait_for(lambda: "(--max-run-time): recycling" in worker.output, 60, "the run time to pass")
        assert worker.returncode is None
        go.touch()
        assert await worker.wait_exit(60) == EXIT_OK
    final = await state.get_state()
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] == ["done"]


async def _is_running(state) -> bool:
    return await state.get_status() == TaskStatus.RUNNING


@pytest.mark.parametrize("flag", ["--max-tasks", "--max-run-time", "--max-load"])
async def test_recycling_flags_refuse_what_is_not_above_0(guillotina_main, flag):
    async with WorkerProcess(worker_config(), flag, "0") as worker:
        assert await worker.wait_exit(60) == 2  # argparse's usage error
    assert f"{flag}: must be a" in worker.output and "above 0, not '0'" in worker.output


@pytest.mark.app_settings({"amqp": {"noop_after": 0.2, "kill_after": 0.6}})
async def test_max_load_pauses_consuming_above_the_limit_and_resumes_below(
    guillotina_main, monkeypatch, info_logs
):
    load = {"now": 5.0}
    monkeypatch.setattr(recycling, "load_average", lambda: load["now"])
    monkeypatch.setattr(recycling, "LOAD_INTERVAL", 0.05)
    # Given a worker started on a loaded machine
    async with running_worker(max_load=2) as worker:
        assert logged(info_logs, "load 5.00 above --max-load 2: taking no tasks") == 1
        state = await add_task(app.add, 1, 2)
        # Then, while the load stays high, the task waits in the queue, not taken
        seen = worker.load_watch.readings
        await wait_for(lambda: worker.load_watch.readings >= seen + 20, what="more load readings")
        assert await ready() == 1
        assert await state.get_status() == TaskStatus.SCHEDULED
        # a paused worker is not an idle one: past kill_after it neither probes nor fails
        assert worker.activity.probes_sent == 0 and not worker.failed.is_set()

        # When the load falls under the limit, then it takes the task
        load["now"] = 0.5
        assert (await state.join(wait=0.05))["result"] == 3
        assert logged(info_logs, "load 0.50 back under --max-load 2: taking tasks again") == 1

        # And it stops taking tasks again when the load rises
        load["now"] = 3.0
        await wait_for(lambda: logged(info_logs, "above --max-load 2") == 2, what="the second pause")
        again = await add_task(app.add, 2, 2)
        seen = worker.load_watch.readings
        await wait_for(lambda: worker.load_watch.readings >= seen + 5, what="more load readings")
        assert await again.get_status() == TaskStatus.SCHEDULED
        load["now"] = 0.1
        assert (await again.join(wait=0.05))["result"] == 4
