"""A failing task is retried through the delay queue, then dead-lettered (docs/design.md#retries)."""

import logging

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.utils import queue_counts, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


def runs(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def counts() -> tuple[int, int, int]:
    """(main, delay, error) messages ready."""
    found = list((await queue_counts()).values())
    return found[0], found[1], found[2]


# a delay long enough that the first run's state is read before the second run starts
@pytest.mark.app_settings({"amqp": {"max_task_retries": 2, "delayed_ttl_ms": 4000}})
async def test_failing_task_goes_through_the_delay_queue_then_to_the_error_queue(guillotina_main, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.fail_until, str(marker), 100)

    # Given a worker, when the task fails once, then it waits in the delay queue, errored
    async with running_worker():
        await wait_for(lambda: runs(marker) == 1, what="the first run")
        await wait_for(lambda: _delayed(), what="the message in the delay queue")
        first = await state.get_state()
        assert first["status"] == TaskStatus.ERRORED
        assert first["job_retries"] == 1
        assert first["error"].startswith("Traceback (most recent call last):")
        assert "RuntimeError: failing run 1" in first["error"]

        # ... and once job_retries reaches max_task_retries it is dead-lettered
        await wait_for(lambda: _in_error_queue(), timeout=60, what="the message in the error queue")

    final = await state.get_state()
    assert runs(marker) == 3  # the first run and two retries
    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 2
    assert "RuntimeError: failing run 3" in final["error"]
    assert await counts() == (0, 0, 1)


async def _delayed() -> bool:
    return (await counts())[1] == 1


async def _in_error_queue() -> bool:
    return (await counts())[2] == 1


@pytest.mark.app_settings({"amqp": {"max_task_retries": 1, "delayed_ttl_ms": 200}})
async def test_every_log_line_about_a_task_names_it_and_its_function(guillotina_main, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="guillotina_amqp"):
        state = await add_task(app.fail_until, str(tmp_path / "runs"), 100)
        async with running_worker():
            await wait_for(lambda: _in_error_queue(), timeout=60, what="the message in the error queue")

    about_task = [r.getMessage() for r in caplog.records if state.task_id in r.getMessage()]
    assert len(about_task) >= 3, about_task  # two failures, then the dead-lettering
    assert all("(tests.app.fail_until)" in line for line in about_task), about_task


@pytest.mark.app_settings({"amqp": {"max_task_retries": 5}})
async def test_task_that_fails_twice_finishes_on_its_third_run(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.fail_until, str(marker), 2)

    # join() would return at the first errored run: wait for the finish instead
    final = await wait_for(lambda: _finished(state), timeout=60, what="the third run to finish")
    assert final["result"] == 3
    assert final["job_retries"] == 2  # a retry keeps its count
    assert runs(marker) == 3
    await wait_for(lambda: _all_empty(), what="every queue to be empty")


async def _finished(state) -> dict | None:
    found = await state.get_state()
    return found if found["status"] == TaskStatus.FINISHED else None


async def _all_empty() -> bool:
    return await counts() == (0, 0, 0)


@pytest.mark.app_settings({"amqp": {"max_task_retries": None, "delayed_ttl_ms": 300}})
async def test_max_task_retries_none_retries_forever(guillotina_main, tmp_path):
    marker = tmp_path / "runs"
    # more failures than the default max_task_retries (5) allows
    state = await add_task(app.fail_until, str(marker), 6)
    async with running_worker() as worker:
        assert worker.max_task_retries is None
        final = await wait_for(lambda: _finished(state), timeout=90, what="the seventh run to finish")
    assert final["result"] == 7
    assert final["job_retries"] == 6
    assert await counts() == (0, 0, 0)


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
async def test_failure_keeps_the_event_log_and_job_data(worker, tmp_path):
    state = await add_task(app.fail, "no retry")
    await wait_for(lambda: _in_error_queue(), what="the message in the error queue")
    final = await state.get_state()
    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 0
    assert final["job_data"]["func"] == "tests.app.fail"
    assert final["job_data"]["args"] == ["no retry"]
    assert "ValueError: no retry" in final["error"]


@pytest.fixture
def settle_log(monkeypatch):
    """What the worker did with messages, in order: ("published", routing key) once confirmed, "ack"."""
    from aioamqp.channel import Channel

    from guillotina_amqp.publishing import Publisher

    events: list = []
    publish, ack = Publisher.publish, Channel.basic_client_ack

    async def confirmed_publish(self, body, routing_key, *args, **kwargs):
        await publish(self, body, routing_key, *args, **kwargs)
        events.append(("published", routing_key))

    async def logged_ack(self, delivery_tag, *args, **kwargs):
        events.append("ack")
        return await ack(self, delivery_tag, *args, **kwargs)

    monkeypatch.setattr(Publisher, "publish", confirmed_publish)
    monkeypatch.setattr(Channel, "basic_client_ack", logged_ack)
    return events


@pytest.mark.app_settings({"amqp": {"max_task_retries": 1}})
async def test_original_is_acked_only_after_the_delay_publish_was_confirmed(worker, settle_log, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.fail_until, str(marker), 1)
    final = await wait_for(lambda: _finished(state), timeout=60, what="the retry to finish")

    assert final["result"] == 2
    delay = f"{worker.settings.queue}-delay"
    # add_task's publish, the retry's publish to the delay queue, its ack, the final ack
    assert settle_log == [("published", worker.settings.queue), ("published", delay), "ack", "ack"]
    assert worker.publisher is not None and worker.publisher._channel.publisher_confirms  # confirm mode


@pytest.mark.app_settings({"amqp": {"max_task_retries": 3}})
async def test_failed_delay_publish_requeues_the_message_instead_of_losing_it(worker, monkeypatch, tmp_path):
    import aioamqp

    from guillotina_amqp.publishing import Publisher

    publish = Publisher.publish
    refused: list[str] = []

    async def broken_delay_queue(self, body, routing_key, *args, **kwargs):
        if routing_key.endswith("-delay") and not refused:
            refused.append(routing_key)
            raise aioamqp.ChannelClosed()
        return await publish(self, body, routing_key, *args, **kwargs)

    monkeypatch.setattr(Publisher, "publish", broken_delay_queue)
    marker = tmp_path / "runs"
    state = await add_task(app.fail_until, str(marker), 1)

    final = await wait_for(lambda: _finished(state), timeout=60, what="the task to run again and finish")
    assert refused, "the delay publish was never attempted"
    assert final["result"] == 2
    assert runs(marker) == 2
    await wait_for(lambda: _all_empty(), what="every queue to be empty")
