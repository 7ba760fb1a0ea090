"""Priorities: `_priority=0..9` and `@task(priority=)` (docs/tasks.md#priorities)."""

import pytest

from guillotina_amqp import add_task, names, task
from guillotina_amqp.exceptions import TaskNotFoundException
from guillotina_amqp.retry import retry_task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.utils import admin_channel, lines, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


async def waiting_with_priority() -> int:
    """Messages ready in this test's priority queue."""
    async with admin_channel() as channel:
        queue = names.priority_queue(get_settings().queue)
        return (await channel.queue_declare(queue, passive=True))["message_count"]


async def finished(states: list[TaskState]) -> bool:
    return all([await state.get_status() == TaskStatus.FINISHED for state in states])


@pytest.mark.parametrize("priority", [10, -1, "9", 4.5, True])
async def test_a_bad_priority_is_refused_at_the_call(guillotina_main, priority):
    with pytest.raises(ValueError, match="_priority must be an integer from 0 to 9"):
        await add_task(app.noop, _priority=priority, _task_id="refused")
    with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
        task(app.decorated_add.func, priority=priority)
    with pytest.raises(TaskNotFoundException):
        await TaskState("refused").get_state()


@pytest.mark.app_settings({"amqp": {"queue_type": "quorum"}})
async def test_quorum_queues_refuse_priorities(guillotina_main):
    with pytest.raises(ValueError, match="quorum"):
        await add_task(app.noop, _priority=3)


async def test_higher_priorities_start_first(guillotina_main, tmp_path):
    """A backlog of low priorities, then high ones, all waiting before a one-slot worker starts."""
    order = tmp_path / "order"
    low = [await add_task(app.write_marker, str(order), f"low{i}", _priority=1) for i in range(5)]
    high = [await add_task(app.write_marker, str(order), f"high{i}", _priority=9) for i in range(5)]
    middle = await app.prioritized(str(order), "middle")  # @task(priority=5)
    await wait_for(lambda: waiting_with_priority(), what="the tasks in the priority queue")

    async with running_worker(max_size=1):
        await wait_for(lambda: finished([*low, *high, middle]), timeout=60, what="every task")

    done = lines(order)
    assert done[:5] == [f"high{i}" for i in range(5)]  # RabbitMQ keeps FIFO within one priority
    assert done[5] == "middle"
    assert done[6:] == [f"low{i}" for i in range(5)]


async def test_a_task_without_priority_still_runs_beside_the_priority_queue(worker):
    assert (await (await add_task(app.add, 1, 2)).join(timeout=30))["result"] == 3
    assert (await (await add_task(app.add, 2, 2, _priority=0)).join(timeout=30))["result"] == 4


async def test_a_retried_task_comes_back_with_its_priority(guillotina_main, tmp_path):
    """Retried, it waits in a delay tier of the priority queue and returns there as a 9: it
    overtakes the low priorities queued meanwhile (without its priority it would come last)."""
    order = tmp_path / "order"
    async with running_worker(max_size=1) as worker:
        retried = await add_task(app.retry_once_then_mark, str(order), "high", _priority=9)
        await wait_for(lambda: worker.total_errored == 1 and not worker._handlers, what="the first run")
    low = [await add_task(app.write_marker, str(order), f"low{i}", _priority=1) for i in range(3)]
    await wait_for(lambda: _count_is(4), what="the retried task back in the priority queue")

    async with running_worker(max_size=1):
        await wait_for(lambda: finished([retried, *low]), timeout=60, what="every task")

    assert lines(order) == ["high", "low0", "low1", "low2"]
    assert (await retried.get_state())["job_retries"] == 1


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
async def test_a_task_run_again_by_retry_keeps_its_priority(guillotina_main, tmp_path):
    """Errored for good, then run again (REST/CLI retry): back in the priority queue as a 9,
    ahead of the low priorities queued meanwhile."""
    order = tmp_path / "order"
    async with running_worker(max_size=1) as worker:
        failed = await add_task(app.retry_once_then_mark, str(order), "high", _priority=9)
        # its message settled (in the error queue) too, not only its state written
        await wait_for(lambda: worker.total_errored == 1 and not worker._handlers, what="the first run")
    assert (await failed.get_state())["status"] == TaskStatus.ERRORED
    low = [await add_task(app.write_marker, str(order), f"low{i}", _priority=1) for i in range(3)]
    await retry_task(failed.task_id)
    await wait_for(lambda: _count_is(4), what="the task run again in the priority queue")

    async with running_worker(max_size=1):
        await wait_for(lambda: finished([failed, *low]), timeout=60, what="every task")

    assert lines(order) == ["high", "low0", "low1", "low2"]


async def _count_is(count: int) -> bool:
    return await waiting_with_priority() == count


async def test_a_countdown_task_waits_then_keeps_its_priority(guillotina_main, tmp_path):
    order = tmp_path / "order"
    later = await add_task(app.write_marker, str(order), "high", _priority=9, _countdown=0.5)
    low = [await add_task(app.write_marker, str(order), f"low{i}", _priority=1) for i in range(3)]
    await wait_for(lambda: _count_is(4), what="the countdown task out of its delay tier")

    async with running_worker(max_size=1):
        await wait_for(lambda: finished([later, *low]), timeout=60, what="every task")

    assert lines(order) == ["high", "low0", "low1", "low2"]


async def test_tasks_without_priority_are_not_starved_by_prioritised_ones(guillotina_main, tmp_path):
    """Both queues hold a backlog when a one-slot worker starts: freed slots go to either."""
    order = tmp_path / "order"
    plain = [await add_task(app.write_marker, str(order), "plain") for _ in range(20)]
    urgent = [await add_task(app.write_marker, str(order), "urgent", _priority=9) for _ in range(20)]
    await wait_for(lambda: _count_is(20), what="the prioritised tasks queued")

    async with running_worker(max_size=1):
        await wait_for(lambda: finished([*plain, *urgent]), timeout=120, what="every task")

    done = lines(order)
    assert "plain" in done[:20] and "urgent" in done[:20]
