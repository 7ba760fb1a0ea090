"""Graceful shutdown (docs/design.md#shutdown): SIGTERM/SIGINT let running tasks finish up to
amqp.shutdown_timeout; what still runs then is left unacked and redelivered."""

import asyncio
import signal

import pytest

from guillotina_amqp import add_task, cancelling
from guillotina_amqp.cancelling import cancel_and_wait
from guillotina_amqp.liveness import EXIT_OK
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from guillotina_amqp.worker import Worker
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import lines, queue_counts, wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_lets_a_running_task_finish_then_exits_0(guillotina_main, tmp_path, sig):
    marker = tmp_path / "marks.txt"
    async with WorkerProcess(worker_config(shutdown_timeout=60)) as worker:
        await worker.wait_consuming()
        state = await add_task(app.sleep_then_mark_pid, str(marker), 1.5)
        await wait_for(lambda: lines(marker), 60, "the task to start")
        worker.signal(sig)
        code = await worker.wait_exit(60)
    pid = worker.process.pid
    assert code == EXIT_OK, worker.output
    assert lines(marker) == [f"started {pid}", f"done {pid}"]
    final = await TaskState(state.task_id).get_state()
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] == pid
    # acked before the connection closed: nothing is left to redeliver
    assert (await queue_counts())[app_queue()] == 0


async def test_stopping_worker_takes_no_new_task(guillotina_main, tmp_path):
    marker, late = tmp_path / "marks.txt", tmp_path / "late.txt"
    async with WorkerProcess(worker_config(shutdown_timeout=60)) as worker:
        await worker.wait_consuming()
        await add_task(app.sleep_then_mark_pid, str(marker), 3)
        await wait_for(lambda: lines(marker), 60, "the task to start")
        worker.signal(signal.SIGTERM)
        await wait_for(lambda: "stopping: waiting up to" in worker.output, 60, "the shutdown to begin")
        state = await add_task(app.sleep_then_mark_pid, str(late), 0)
        code = await worker.wait_exit(60)
    assert code == EXIT_OK, worker.output
    assert lines(late) == [], "the stopping worker took a new task"
    assert await state.get_status() == TaskStatus.SCHEDULED
    assert (await queue_counts())[app_queue()] == 1  # left in the queue for the next worker


async def test_task_outliving_shutdown_timeout_is_redelivered_to_another_worker(guillotina_main, tmp_path):
    marker = tmp_path / "marks.txt"
    async with WorkerProcess(worker_config(shutdown_timeout=0.5)) as first:
        await first.wait_consuming()
        state = await add_task(app.sleep_then_mark_pid, str(marker), 4)
        await wait_for(lambda: lines(marker), 60, "the task to start")
        async with WorkerProcess(worker_config()) as second:
            await second.wait_consuming()
            first.signal(signal.SIGTERM)
            assert await first.wait_exit(60) == EXIT_OK, first.output
            final = await TaskState(state.task_id).join()
    assert final["status"] == TaskStatus.FINISHED, final
    assert final["result"] == second.process.pid
    assert lines(marker) == [
        f"started {first.process.pid}",
        f"started {second.process.pid}",
        f"done {second.process.pid}",
    ]
    assert f"Task {state.task_id} (tests.app.sleep_then_mark_pid) still running after 0.5s" in first.output


async def test_second_signal_stops_waiting(guillotina_main, tmp_path):
    marker = tmp_path / "marks.txt"
    async with WorkerProcess(worker_config(shutdown_timeout=600)) as worker:
        await worker.wait_consuming()
        state = await add_task(app.sleep_then_mark_pid, str(marker), 600)
        await wait_for(lambda: lines(marker), 60, "the task to start")
        worker.signal(signal.SIGTERM)
        await wait_for(lambda: "waiting up to 600s" in worker.output, 60, "the shutdown to begin")
        worker.signal(signal.SIGINT)
        code = await worker.wait_exit(60)
    assert code == EXIT_OK, worker.output
    assert lines(marker) == [f"started {worker.process.pid}"]
    # left unacked: back in the queue for the next worker, its lock released
    await wait_for(lambda: _ready_in_main_queue(1), 30, "the message back in the queue")
    assert not await get_state_manager().is_locked(state.task_id)
    assert await TaskState(state.task_id).get_status() == TaskStatus.SCHEDULED


async def _ready_in_main_queue(count: int) -> bool:
    return (await queue_counts())[app_queue()] == count


def app_queue() -> str:
    from guillotina_amqp.settings import get_settings

    return get_settings().queue


async def _swallowing_once(swallowed: list[int]) -> None:
    """A loop that lives through one cancellation, as one does under Python 3.11's wait_for
    when the cancel arrives just as the call it waits for completes."""
    while True:
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(1)


async def test_cancel_and_wait_cancels_again_what_lived_through_a_cancellation():
    swallowed: list[int] = []
    task = asyncio.create_task(_swallowing_once(swallowed))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task], patience=0.1), 30)
    assert task.cancelled() and swallowed == [1]


async def test_a_stopping_worker_does_not_wait_for_ever_on_a_loop_that_swallowed_its_cancel(
    guillotina_main, monkeypatch
):
    monkeypatch.setattr(cancelling, "PATIENCE", 0.1)
    swallowed: list[int] = []
    worker = Worker()
    await worker.start()
    loop_task = asyncio.create_task(_swallowing_once(swallowed))
    worker._background.append(loop_task)
    await asyncio.sleep(0)
    await asyncio.wait_for(worker.stop(), 30)
    assert loop_task.cancelled() and swallowed == [1]
    assert not worker.connection.is_open
