"""The public Python API (docs/design.md#public-api), as an application uses it."""

import json
import logging
import re

import pytest
from guillotina import app_settings
from guillotina.component import query_utility

import guillotina_amqp
from guillotina_amqp import add_task, cancel_task, task
from guillotina_amqp.interfaces import IStateManagerUtility, ITaskDefinition, MessageType
from guillotina_amqp.publishing import Publisher
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from guillotina_amqp.utils import cancel_task as utils_cancel_task
from tests import app
from tests.utils import BOTH_MANAGERS, queue_counts, running_worker, wait_for

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NO_RETRIES = pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})


async def multiply(a: int, b: int) -> int:
    return a * b


#: `task(func, retries=...)`: the non-decorator spelling.
multiply_task = task(multiply, retries=2)


@pytest.fixture
def published_retries(monkeypatch):
    """The `retries` every publish was asked for, in order."""
    seen = []
    original = Publisher.publish

    async def publish(self, *args, **kwargs):
        seen.append(kwargs.get("retries"))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Publisher, "publish", publish)
    return seen


# -- add_task ---------------------------------------------------------------------


async def test_add_task_is_scheduled_until_a_worker_runs_it(guillotina_main, outside_container):
    state = await add_task(app.add, 1, 2)

    assert isinstance(state, TaskState)
    assert await state.get_status() == TaskStatus.SCHEDULED
    with pytest.raises(guillotina_amqp.exceptions.TaskNotFinishedException):
        await state.get_result()

    async with running_worker():
        final = await state.join()
    assert final["status"] == TaskStatus.FINISHED
    assert await state.get_status() == TaskStatus.FINISHED
    assert await state.get_result() == 3


async def test_task_id_outside_a_container_is_a_bare_uuid4(guillotina_main, outside_container):
    state = await add_task(app.noop)
    assert re.fullmatch(UUID4, state.task_id)


async def test_task_id_inside_a_container_names_db_and_container(container_requester, worker):
    async with container_requester as requester:
        body, status = await requester("POST", "/db/guillotina/@test-schedule", data=json.dumps({}))
        assert status == 200
        assert re.fullmatch(rf"task:db-guillotina-{UUID4}", body["task_id"])
        final = await TaskState(body["task_id"]).join()
        assert final["status"] == TaskStatus.FINISHED
        assert final["result"]["task_id"] == body["task_id"]


async def test_task_id_override(worker, outside_container):
    state = await add_task(app.add, 2, 2, _task_id="my-own-id")
    assert state.task_id == "my-own-id"
    assert (await state.join())["result"] == 4


async def test_request_override_is_the_request_the_task_runs_with(worker, outside_container):
    from guillotina.tests.utils import make_mocked_request

    request = make_mocked_request("PATCH", "/db/guillotina/some/where", headers={"X-Custom": "given"})
    final = await (await add_task(app.context_info, _request=request)).join()
    assert final["result"]["url"].endswith("/db/guillotina/some/where")
    assert (final["result"]["method"], final["result"]["header"]) == ("PATCH", "given")


async def test_retries_reach_the_publisher(worker, outside_container, published_retries):
    state = await add_task(app.add, 1, 1, _retries=7)
    assert (await state.join())["result"] == 2
    assert published_retries == [7]


async def test_task_reads_its_own_id_from_amqp_job(worker, outside_container):
    state = await add_task(app.context_info)
    assert (await state.join())["result"]["task_id"] == state.task_id


async def test_add_task_without_amqp_settings_logs_and_returns_none(
    guillotina_main, outside_container, caplog
):
    saved = app_settings.pop("amqp")
    try:
        with caplog.at_level(logging.WARNING, logger="guillotina_amqp"):
            assert await add_task(app.add, 1, 2) is None
            assert await app.decorated_add(1, 2) is None
    finally:
        app_settings["amqp"] = saved
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "amqp" in r.getMessage()]
    assert len(warnings) == 2
    assert "tests.app.add" in warnings[0].getMessage()


# -- @task / task(...) --------------------------------------------------------------


async def test_task_definition_schedules_when_awaited(worker, outside_container):
    assert ITaskDefinition.providedBy(app.decorated_add)
    assert ITaskDefinition.providedBy(multiply_task)
    assert multiply_task.func is multiply
    assert await multiply_task.func(3, 4) == 12  # .func runs in-process, schedules nothing

    by_call = await app.decorated_add(1, 2)
    by_schedule = await app.decorated_add.schedule(3, 4)
    by_plain = await multiply_task(5, 6)

    assert [(await s.join())["result"] for s in (by_call, by_schedule, by_plain)] == [3, 7, 30]


async def test_task_retries_are_the_publish_retries(worker, outside_container, published_retries):
    await (await multiply_task(2, 2)).join()
    await (await app.decorated_info()).join()
    await (await app.decorated_add(1, 1)).join()
    assert published_retries == [2, 1, 3]


async def test_after_request_schedules_once_the_request_finished(container_requester, worker):
    async with container_requester as requester:
        body, status = await requester(
            "POST",
            "/db/guillotina/@test-deferred",
            data=json.dumps({"hook": "after_request", "a": 1, "b": 2}),
        )
        assert status == 200
        assert re.fullmatch(r"[0-9a-f]{32}", body["name"])
        assert body["existing"] == []  # nothing scheduled while the request ran
        final = await _only_task_of_container(requester)
        assert final["result"] == 3

        body, status = await requester(
            "POST",
            "/db/guillotina/@test-deferred",
            data=json.dumps({"hook": "after_request", "a": 2, "b": 2, "name": "my-future"}),
        )
        assert status == 200
        assert body["name"] == "my-future"


@pytest.mark.parametrize("hook", ["after_commit", "before_commit"])
async def test_commit_hooks_schedule_only_with_the_commit(container_requester, worker, hook):
    async with container_requester as requester:
        failing = {"hook": hook, "a": 100, "b": 100, "fail": True}
        _, status = await requester("POST", "/db/guillotina/@test-deferred", data=json.dumps(failing))
        assert status == 500  # aborted: its task must never be scheduled

        body, status = await requester(
            "POST", "/db/guillotina/@test-deferred", data=json.dumps({"hook": hook, "a": 2, "b": 3})
        )
        assert status == 200
        assert body["existing"] == []
        final = await _only_task_of_container(requester)
        assert final["result"] == 5


async def _only_task_of_container(requester) -> dict:
    """Wait for the container's one task to end; fail if there is another."""
    task_ids = await wait_for(lambda: _container_tasks(requester), timeout=30, what="a task in the container")
    final = await TaskState(task_ids[0]).join()
    assert await _container_tasks(requester) == task_ids
    assert len(task_ids) == 1
    return final


async def _container_tasks(requester) -> list:
    body, status = await requester("GET", "/db/guillotina/@amqp-tasks")
    assert status == 200
    return body


# -- TaskState --------------------------------------------------------------------------


@BOTH_MANAGERS
async def test_cancel_before_running(guillotina_main, outside_container, manager):
    state = await add_task(app.add, 1, 2)
    assert await state.is_canceled() is False

    assert await state.cancel() is True
    assert await state.is_canceled() is True
    assert await state.cancel() is True  # already canceled

    async with running_worker():
        final = await state.join()
    assert final["status"] == TaskStatus.CANCELED
    with pytest.raises(guillotina_amqp.exceptions.TaskNotFinishedException):
        await state.get_result()


@BOTH_MANAGERS
async def test_cancel_a_finished_task_changes_nothing(worker, outside_container, manager):
    state = await add_task(app.add, 1, 2)
    await state.join()
    assert await state.cancel() is True
    assert await utils_cancel_task(state.task_id) is True
    assert await state.get_status() == TaskStatus.FINISHED
    assert await state.get_result() == 3


@BOTH_MANAGERS
async def test_cancel_task_by_id(guillotina_main, outside_container, manager):
    assert cancel_task is utils_cancel_task
    assert await cancel_task("no-such-task") is False
    state = await add_task(app.noop)
    assert await cancel_task(state.task_id) is True
    assert await state.is_canceled() is True


@BOTH_MANAGERS
async def test_unknown_task_ids_raise_not_found(guillotina_main, manager):
    state = TaskState("no-such-task")
    for call in (state.get_state, state.get_status, state.get_result, state.join, state.cancel):
        with pytest.raises(guillotina_amqp.exceptions.TaskNotFoundException):
            await call()


@BOTH_MANAGERS
async def test_lock_acquire_refresh_release(guillotina_main, outside_container, manager):
    state = await add_task(app.noop)
    assert await state.acquire(ttl=30) is True
    assert await state.acquire(ttl=30) is False  # held, even by ourselves
    assert await state.refresh_lock(ttl=30) is True
    assert await state.release() is True
    assert await state.acquire() is True


@BOTH_MANAGERS
@pytest.mark.parametrize("kind,expected", [("zero", 0), ("empty", ""), ("list", []), ("false", False)])
async def test_falsy_results_are_stored(worker, outside_container, manager, kind, expected):
    state = await add_task(app.falsy, kind)
    final = await state.join()
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] == expected and type(final["result"]) is type(expected)
    assert await state.get_result() == expected


@NO_RETRIES
async def test_failing_task_is_errored_with_its_traceback(worker, outside_container):
    state = await add_task(app.fail, "it broke")
    final = await state.join()

    assert final["status"] == TaskStatus.ERRORED
    assert final["error"].startswith("Traceback (most recent call last):")
    assert "ValueError: it broke" in final["error"]
    assert "in fail" in final["error"]
    assert await state.get_result() is None  # errored tasks have a (None) result
    queue = worker.settings.queue
    await wait_for(lambda: _count(f"{queue}-error"), what="the message in the error queue")
    counts = await queue_counts()
    assert (counts[queue], counts[f"{queue}-delay"]) == (0, 0)  # not retried
    assert (worker.total_run, worker.total_errored) == (1, 1)


async def _count(queue: str) -> int:
    return (await queue_counts())[queue]


# -- names and values -----------------------------------------------------------------


@BOTH_MANAGERS
async def test_get_state_manager_is_the_configured_utility(guillotina_main, manager):
    found = get_state_manager()
    assert found is query_utility(IStateManagerUtility, name=manager)
    assert IStateManagerUtility.providedBy(found)


def test_status_and_message_type_values():
    names = ("SCHEDULED", "CANCELED", "RUNNING", "FINISHED", "ERRORED")
    assert {name: getattr(TaskStatus, name) for name in names} == {
        "SCHEDULED": "scheduled",
        "CANCELED": "canceled",
        "RUNNING": "running",
        "FINISHED": "finished",
        "ERRORED": "errored",
    }
    assert TaskStatus.FINISHED == "finished"
    assert MessageType.RESULT == "result" and MessageType.DEBUG == "debug"


def test_public_names_are_importable():
    from guillotina_amqp import exceptions

    for name in (
        "TaskNotFinishedException",
        "TaskNotFoundException",
        "TaskAlreadyAcquired",
        "TaskAccessUnauthorized",
        "TaskMaxRetriesReached",
        "ObjectNotFoundException",
        "AMQPConfigurationNotFoundError",
    ):
        assert issubclass(getattr(exceptions, name), Exception)
    for name in ("add_task", "add_object_task", "cancel_task", "task", "object_task"):
        assert callable(getattr(guillotina_amqp, name))
    from guillotina_amqp.task_vars import amqp_job  # noqa: F401
    from guillotina_amqp.worker import Worker  # noqa: F401
