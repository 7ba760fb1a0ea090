"""Eager mode (docs/tasks.md#eager-mode): add_task runs the task in the calling process; no RabbitMQ."""

import asyncio
import json

import pytest

from guillotina_amqp import add_task, eager, publishing
from guillotina_amqp.exceptions import TaskCanceled, TaskErrored
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.utils import lines

#: nothing listens on port 1: any attempt to reach RabbitMQ would fail or hang
EAGER = pytest.mark.app_settings({"amqp": {"eager": True, "port": 1, "delayed_ttl_ms": 200}})
pytestmark = EAGER


def kinds(task_id: str) -> list[str]:
    return [type(event).__name__ for event in app.events_of(task_id)]


async def eagerly(coroutine):
    """Await an add_task: eager mode returns at once, it never waits on a broker."""
    return await asyncio.wait_for(coroutine, 10)


@pytest.mark.usefixtures("outside_container")
async def test_add_task_runs_the_task_before_returning_without_any_broker(guillotina_main):
    state = await eagerly(add_task(app.add, 1, 2))

    found = await state.get_state()
    assert (found["status"], found["result"]) == (TaskStatus.FINISHED, 3)
    assert kinds(state.task_id) == ["TaskScheduledEvent", "TaskStartedEvent", "TaskFinishedEvent"]
    assert publishing._publishers == {}  # no connection was ever opened


async def test_the_task_runs_in_the_scheduling_context(container_requester):
    async with container_requester as requester:
        response, status = await requester("POST", "/db/guillotina/@test-schedule", data=json.dumps({}))
        assert status == 200, response

    found = await TaskState(response["task_id"]).get_state()
    assert found["status"] == TaskStatus.FINISHED
    seen = found["result"]
    assert seen["container"] == "guillotina"
    assert seen["user"] == "root"
    assert seen["task_id"] == response["task_id"]


@pytest.mark.usefixtures("outside_container")
async def test_a_failure_is_retried_in_process_after_the_delay(guillotina_main, tmp_path):
    state = await eagerly(add_task(app.fail_until, str(tmp_path / "runs"), 1))

    first = await state.get_state()
    assert (first["status"], first["job_retries"]) == (TaskStatus.ERRORED, 1)
    await asyncio.wait_for(eager.get_worker(get_settings()).join(), 30)  # the retry's run

    assert await state.result(timeout=1) == 2
    assert kinds(state.task_id) == [
        "TaskScheduledEvent",
        "TaskStartedEvent",
        "TaskErroredEvent",
        "TaskRetriedEvent",
        "TaskStartedEvent",
        "TaskFinishedEvent",
    ]


@pytest.mark.usefixtures("outside_container")
async def test_steering_exceptions_and_time_limits_behave_as_on_a_worker(guillotina_main, tmp_path):
    discarded = await eagerly(add_task(app.steer, str(tmp_path / "d"), "discard"))
    failed = await eagerly(add_task(app.steer, str(tmp_path / "f"), "fail"))
    rejected = await eagerly(add_task(app.steer, str(tmp_path / "r"), "reject", None, 1, _max_retries=0))
    timed_out = await eagerly(add_task(app.sleep, 30, _timeout=0.2, _max_retries=0))
    await asyncio.wait_for(eager.get_worker(get_settings()).join(), 30)

    with pytest.raises(TaskCanceled, match="nothing left to do"):
        await discarded.result(timeout=1)
    with pytest.raises(TaskErrored, match="the server said 404"):
        await failed.result(timeout=1)
    assert await rejected.result(timeout=1) == 2
    assert len(lines(tmp_path / "r")) == 2
    with pytest.raises(TaskErrored, match=r"TaskTimeout.*timeout=0.2s"):
        await timed_out.result(timeout=1)
    assert publishing._publishers == {}
