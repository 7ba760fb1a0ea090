"""Task events (docs/tasks.md#events), received in order by the subscribers registered in tests/app.py."""

import logging

import pytest

from guillotina_amqp import add_task, interfaces
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.test_control import ended
from tests.utils import lines, logged, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


def kinds(task_id: str) -> list[str]:
    return [
        type(event).__name__.removeprefix("Task").removesuffix("Event") for event in app.events_of(task_id)
    ]


async def told(task_id: str, *expected: str) -> list:
    """The worker's events of the task once they are `expected`, in that order.

    Scheduled is told once, by the scheduling process once the broker has the message:
    a worker may have started the task by then, so it is checked apart.
    """

    def worker_kinds() -> list[str]:
        return [kind for kind in kinds(task_id) if kind != "Scheduled"]

    await wait_for(lambda: worker_kinds() == list(expected), what=f"events {expected}, got {kinds(task_id)}")
    assert kinds(task_id).count("Scheduled") == 1
    return [event for event in app.events_of(task_id) if not interfaces.ITaskScheduledEvent.providedBy(event)]


async def test_a_finished_task_tells_scheduled_started_finished(worker):
    state = await add_task(app.add, 1, 2)

    started, finished = await told(state.task_id, "Started", "Finished")

    assert interfaces.ITaskStartedEvent.providedBy(started)
    assert interfaces.ITaskFinishedEvent.providedBy(finished) and finished.result == 3
    every = app.events_of(state.task_id)
    assert all(interfaces.ITaskEvent.providedBy(e) and e.dotted_name == "tests.app.add" for e in every)


@pytest.mark.app_settings({"amqp": {"max_task_retries": 1, "delayed_ttl_ms": 300}})
async def test_a_failure_tells_errored_and_retried_then_errored_for_good(worker, tmp_path):
    state = await add_task(app.fail_until, str(tmp_path / "runs"), 100)

    events = await told(state.task_id, "Started", "Errored", "Retried", "Started", "Errored")

    errored, retried, last = events[1], events[2], events[4]
    assert interfaces.ITaskErroredEvent.providedBy(errored) and interfaces.ITaskRetriedEvent.providedBy(
        retried
    )
    assert isinstance(errored.exception, RuntimeError) and "failing run 1" in errored.error
    assert retried.delay == 0.3 and "failing run 1" in retried.error
    assert "failing run 2" in last.error


async def test_discard_and_cancel_tell_canceled(worker, tmp_path):
    discarded = await add_task(app.steer, str(tmp_path / "runs"), "discard")

    *_, canceled = await told(discarded.task_id, "Started", "Canceled")
    assert interfaces.ITaskCanceledEvent.providedBy(canceled) and canceled.reason == "nothing left to do"

    marker = tmp_path / "slow"
    running = await add_task(app.sleep_then_mark, str(marker), 60)
    await wait_for(lambda: lines(marker) == ["started"], what="the slow task to start")
    await running.cancel()
    *_, canceled = await told(running.task_id, "Started", "Canceled")
    assert canceled.reason is None


async def test_a_failing_subscriber_is_logged_and_changes_nothing(worker, tmp_path, caplog):
    marker = tmp_path / "runs"
    app.ANGRY_ABOUT.add("angry-task")
    try:
        with caplog.at_level(logging.ERROR, logger="guillotina_amqp"):
            state = await add_task(app.steer, str(marker), "none", None, 0, _task_id="angry-task")
            final = await ended(state)
    finally:
        app.ANGRY_ABOUT.discard("angry-task")

    # the task ran once and finished; the subscribers after the failing one were all told
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 1)
    assert len(lines(marker)) == 1
    await told(state.task_id, "Started", "Finished")
    assert logged(caplog, "angry-task", "subscriber", "failed") == 3
