"""Plain `def` tasks off the event loop (docs/tasks.md): `run_in="thread"` and `run_in="process"`."""

import os

import orjson
import pytest

from guillotina_amqp import add_task, get_task_context, object_task, task
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.test_context import TOKEN_USERS, bearer, schedule
from tests.test_security import task_message
from tests.utils import error_queue_count, lines, publish_raw, wait_for

POOLS = pytest.mark.parametrize("run_in", ["thread", "process"])
NO_RETRIES = pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})


@POOLS
async def test_the_loop_serves_other_tasks_while_a_plain_def_computes(
    worker, outside_container, tmp_path, run_in
):
    marks, go = tmp_path / "sync", tmp_path / "go"
    # Given a plain def that blocks its thread or process until told
    blocking = await add_task(app.wait_for_file, str(marks), str(go), _run_in=run_in)
    await wait_for(lambda: len(lines(marks)) == 1, what="the plain def to start")

    # When an async task comes meanwhile, then it finishes while the plain def still computes
    other = await add_task(app.sleep_then_add, 0.01, 1, 2)
    assert (await other.join(wait=0.05))["result"] == 3
    assert lines(marks)[1:] == []
    assert await blocking.get_status() == TaskStatus.RUNNING

    go.touch()
    assert (await blocking.join(wait=0.05))["result"] == "done"
    pid = int(lines(marks)[0].split()[1])
    assert (pid == os.getpid()) is (run_in == "thread")


@POOLS
@NO_RETRIES
@pytest.mark.parametrize("raised, shown", [("sync boom", "ValueError: sync boom"), ("exit", "SystemExit")])
async def test_an_exception_of_a_plain_def_errors_the_task_and_the_worker_serves_on(
    worker, outside_container, run_in, raised, shown
):
    state = await add_task(app.sync_fail, raised, _run_in=run_in)
    final = await state.join(wait=0.05)
    assert final["status"] == TaskStatus.ERRORED
    assert shown in final["error"]  # SystemExit too: it never stops the worker
    assert "in sync_fail" in final["error"]  # the frame where it was raised, even in another process
    assert (await (await add_task(app.add, 1, 2)).join(wait=0.05))["result"] == 3


@NO_RETRIES
async def test_a_process_run_past_its_timeout_is_killed(worker, outside_container, tmp_path):
    marks = tmp_path / "sync"
    # the first process run starts the fork server: not within the time limit under test
    assert (await (await app.process_context()).join(wait=0.05))["status"] == TaskStatus.FINISHED
    never = str(tmp_path / "never")
    state = await add_task(app.wait_for_file, str(marks), never, _run_in="process", _timeout=5)
    await wait_for(lambda: lines(marks), what="the process to start")
    pid = int(lines(marks)[0].split()[1])

    final = await wait_for(_ended(state), timeout=60, what="the timeout")
    assert final["status"] == TaskStatus.ERRORED
    assert "TaskTimeout: the task ran longer than its time limit (timeout=5s)" in final["error"]
    await wait_for(lambda: not _alive(pid), what="the process to be gone")
    assert lines(marks)[1:] == []


def _ended(state: TaskState):
    async def ended() -> dict | None:
        found = await state.get_state()
        return found if found.get("status") == TaskStatus.ERRORED else None

    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_canceling_a_process_run_kills_its_process(worker, outside_container, tmp_path):
    marks = tmp_path / "sync"
    state = await add_task(app.wait_for_file, str(marks), str(tmp_path / "never"), _run_in="process")
    await wait_for(lambda: lines(marks), what="the process to start")
    await state.cancel()
    assert (await state.join(wait=0.05))["status"] == TaskStatus.CANCELED
    await wait_for(lambda: not _alive(int(lines(marks)[0].split()[1])), what="the process to be gone")


@TOKEN_USERS
@pytest.mark.parametrize("name", ["thread_context", "process_context"])
async def test_a_plain_def_sees_its_context_as_plain_data(container_requester, worker, name):
    async with container_requester as requester:
        final = await schedule(
            requester,
            "@test-run",
            {"task": name},
            token=bearer("alice", ["tests.Scheduler"], ["editors"]),
            auth_type="Bearer",
        )
    assert final["status"] == TaskStatus.FINISHED, final
    seen = final["result"]
    assert seen["task_id"] == final["job_data"]["task_id"]
    assert (seen["user_id"], seen["groups"]) == ("alice", ["editors"])
    assert "tests.Scheduler" in seen["roles"]
    assert (seen["db_id"], seen["container_id"]) == ("db", "guillotina")
    assert (seen["pid"] == os.getpid()) is (name == "thread_context")


async def test_async_tasks_see_their_context_too(worker, outside_container):
    state = await add_task(app.sync_context)  # a plain def on the loop, as the original ran it
    seen = (await state.join(wait=0.05))["result"]
    assert (seen["task_id"], seen["pid"]) == (state.task_id, os.getpid())
    with pytest.raises(LookupError):
        get_task_context()


def test_bad_run_in_is_refused_at_decoration_naming_the_task():
    with pytest.raises(ValueError, match=r"tests.app.sync_fail: run_in must be"):
        task(app.sync_fail, run_in="gpu")
    with pytest.raises(ValueError, match=r"tests.app.add: run_in is for plain `def` functions"):
        task(app.add, run_in="thread")
    with pytest.raises(ValueError, match=r"object task tests.app.sync_fail: run_in is not for object tasks"):
        object_task(app.sync_fail, run_in="thread")


async def test_bad_run_in_is_refused_at_the_call(guillotina_main, outside_container):
    with pytest.raises(ValueError, match="run_in"):
        await add_task(app.sync_fail, "x", _run_in="gpu")


@pytest.mark.parametrize("fields", [{"run_in": "gpu"}, {"run_in": 1}, {"run_in": ["thread"]}])
async def test_a_hostile_run_in_goes_to_the_error_queue(worker, outside_container, fields):
    await publish_raw(orjson.dumps({**task_message("tests.app.sync_fail", "x"), **fields}))
    await wait_for(lambda: _one_error(), what="the message in the error queue")
    assert (await (await add_task(app.add, 1, 2)).join(wait=0.05))["result"] == 3


async def _one_error() -> bool:
    return await error_queue_count() == 1
