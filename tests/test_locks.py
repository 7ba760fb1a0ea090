"""Task locks: one run at a time, refreshed while running, never a reason to drop a task (docs/design.md)."""

import asyncio

import orjson
import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus, get_state_manager
from tests import app
from tests.utils import (
    BOTH_MANAGERS,
    all_empty,
    lines,
    logged,
    publish_raw,
    running_worker,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("outside_container", "info_logs")


@BOTH_MANAGERS
@pytest.mark.app_settings({"amqp": {"lock_ttl": 1}})
async def test_lock_is_held_and_refreshed_while_the_task_runs(worker, manager, tmp_path):
    manager_ = get_state_manager()
    marker = tmp_path / "runs"
    # runs for 3 lock TTLs: without refreshes the lock would expire mid-run
    state = await add_task(app.sleep_then_mark, str(marker), 3)
    await wait_for(lambda: lines(marker) == ["started"], what="the task to start")

    samples = []
    while True:
        locked = await manager_.is_locked(state.task_id)
        # finishing writes the status and frees the lock at once: a lock read before a status
        # that is still running was read while the task ran (the other order races the end)
        if await state.get_status() != TaskStatus.RUNNING:
            break
        samples.append(locked)
        await asyncio.sleep(0.1)

    assert len(samples) >= 10 and all(samples), samples
    assert await state.get_status() == TaskStatus.FINISHED
    assert await manager_.is_locked(state.task_id) is False  # released at the end


@BOTH_MANAGERS
@pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
async def test_lock_is_released_when_the_task_fails(worker, manager):
    state = await add_task(app.fail)
    final = await state.join()
    assert final["status"] == TaskStatus.ERRORED
    assert await get_state_manager().is_locked(state.task_id) is False


@BOTH_MANAGERS
async def test_task_locked_by_another_worker_waits_in_the_delay_queue(
    guillotina_main, manager, tmp_path, caplog
):
    marker = tmp_path / "runs"
    state = await add_task(app.write_marker, str(marker))
    assert await state.acquire(ttl=60) is True  # another holder (not the worker) has the lock

    async with running_worker():
        # delayed, back, delayed again: cycling through the delay queue, not dropped
        await wait_for(lambda: logged(caplog, state.task_id, "locked by another worker") >= 2, timeout=60)
        assert not marker.exists()
        assert await state.get_status() == TaskStatus.SCHEDULED
        assert await state.release() is True

        final = await state.join()
        await wait_for(all_empty, what="every queue to be empty")

    assert final["status"] == TaskStatus.FINISHED
    assert final.get("job_retries", 0) == 0  # waiting for a lock is not a failure
    assert lines(marker) == ["ran"]


async def test_two_deliveries_of_one_task_at_once_run_it_once(guillotina_main, tmp_path, caplog):
    marker = tmp_path / "runs"
    job = {"func": "tests.app.sleep_then_mark", "args": [str(marker), 1], "kwargs": {}, "task_id": "dup-task"}
    async with running_worker(), running_worker():
        # two workers, two copies of the same message: whoever claims second must not run it
        await publish_raw(orjson.dumps(job))
        await publish_raw(orjson.dumps(job))
        await wait_for(lambda: "done" in lines(marker), what="the task to finish")
        # skipped by the other worker, or kept aside by the one running it until its run ends
        await wait_for(
            lambda: (
                logged(caplog, "dup-task", "skipping") + logged(caplog, "dup-task", "delivered again") == 1
            ),
            timeout=60,
            what="the copy skipped",
        )
        await wait_for(all_empty, what="every queue to be empty")
    assert lines(marker) == ["started", "done"]
    assert (await get_state_manager().get("dup-task"))["status"] == TaskStatus.FINISHED


@BOTH_MANAGERS
async def test_duplicate_delivery_of_a_finished_task_is_acked_and_skipped(worker, manager, tmp_path, caplog):
    marker = tmp_path / "runs"
    state = await add_task(app.write_marker, str(marker), "once")
    final = await state.join()
    assert final["status"] == TaskStatus.FINISHED

    await publish_raw(orjson.dumps(final["job_data"]))  # the broker delivers it again
    await wait_for(lambda: logged(caplog, state.task_id, "skipping") == 1, what="the duplicate to be skipped")
    await wait_for(all_empty, what="the duplicate to be acked")

    assert lines(marker) == ["once"]
    assert await state.get_state() == final
