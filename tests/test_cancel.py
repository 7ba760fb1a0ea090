"""Cancelling a task before or while it runs (docs/design.md#cancellation), by every public way."""

import logging
import uuid

import orjson
import pytest

from guillotina_amqp import add_task, cancel_task
from guillotina_amqp.names import task_id_prefix
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from tests import app
from tests.utils import BOTH_MANAGERS, all_empty, lines, publish_raw, running_worker, wait_for

HOW = pytest.mark.parametrize("how", ["cancel_task", "TaskState.cancel", "DELETE @amqp-tasks"])


pytestmark = pytest.mark.usefixtures("outside_container")


def container_task_id() -> str:
    """An id of container "guillotina" (so REST finds it); the task itself runs outside it."""
    return task_id_prefix("db", "guillotina") + str(uuid.uuid4())


async def cancel(requester, how: str, task_id: str) -> None:
    if how == "cancel_task":
        assert await cancel_task(task_id) is True
    elif how == "TaskState.cancel":
        assert await TaskState(task_id).cancel() is True
    else:
        body, status = await requester("DELETE", f"/db/guillotina/@amqp-tasks/{task_id}")
        assert (status, body) == (200, True)


@BOTH_MANAGERS
@HOW
async def test_cancel_before_a_worker_starts_it(container_requester, manager, how, tmp_path):
    marker = tmp_path / "runs"
    async with container_requester as requester:
        state = await add_task(app.write_marker, str(marker), _task_id=container_task_id())
        await cancel(requester, how, state.task_id)

        async with running_worker() as worker:
            final = await state.join()
            await wait_for(all_empty, what="the message to be acked")
            await worker.join()

    assert final["status"] == TaskStatus.CANCELED
    assert not marker.exists(), "a canceled task ran"
    assert worker.total_run == 0
    assert await get_state_manager().is_canceled(state.task_id) is False  # the cancel set is cleaned


@BOTH_MANAGERS
@HOW
async def test_cancel_while_running_cancels_the_coroutine(container_requester, manager, how, tmp_path):
    marker = tmp_path / "runs"
    async with container_requester as requester:
        async with running_worker() as worker:
            state = await add_task(app.sleep_then_mark, str(marker), 120, _task_id=container_task_id())
            await wait_for(lambda: lines(marker) == ["started"], what="the task to start")
            assert await state.get_status() == TaskStatus.RUNNING

            await cancel(requester, how, state.task_id)
            final = await wait_for(lambda: _canceled(state), timeout=30, what="the worker to cancel the task")
            await worker.join()  # the coroutine really ended: nothing runs on the worker any more
            assert worker.num_running == 0
            await wait_for(all_empty, what="the message to be acked")

    assert lines(marker) == ["started"]  # never got to "done"
    assert final.get("job_retries", 0) == 0  # not retried
    assert worker.total_run == 1 and worker.total_errored == 0
    assert await get_state_manager().is_canceled(state.task_id) is False


async def _canceled(state: TaskState) -> dict | None:
    found = await state.get_state()
    return found if found["status"] == TaskStatus.CANCELED else None


@BOTH_MANAGERS
async def test_cancel_is_not_undone_by_a_redelivery(guillotina_main, manager, tmp_path, caplog):
    """Once canceled, a second delivery of the same message is acked and skipped too."""
    caplog.set_level(logging.INFO, "guillotina_amqp")
    marker = tmp_path / "runs"
    state = await add_task(app.write_marker, str(marker))
    await state.cancel()
    async with running_worker():
        await state.join()
        job = {
            "func": "tests.app.write_marker",
            "args": [str(marker)],
            "kwargs": {},
            "task_id": state.task_id,
        }
        await publish_raw(orjson.dumps(job))
        await wait_for(lambda: _skipped(caplog, state.task_id) == 2, what="both deliveries to be skipped")
        await wait_for(all_empty, what="the duplicate to be acked")
    assert await state.get_status() == TaskStatus.CANCELED
    assert not marker.exists()


def _skipped(caplog, task_id: str) -> int:
    return sum(task_id in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


@BOTH_MANAGERS
async def test_cancelling_an_unknown_id_is_not_found(container_requester, manager):
    unknown = container_task_id()
    async with container_requester as requester:
        body, status = await requester("DELETE", f"/db/guillotina/@amqp-tasks/{unknown}")
        assert (status, body) == (404, {"reason": "Task not found"})
        body, status = await requester("DELETE", f"/db/guillotina/@amqp-cancel/{unknown}")
        assert status == 404
    assert await cancel_task(unknown) is False
    assert await get_state_manager().exists(unknown) is False  # cancelling created nothing
