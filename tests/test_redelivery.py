"""Copies redelivered while this worker runs their task (guillotina_amqp/redelivery.py).

The end-to-end case, on a RabbitMQ node with a 5 s consumer_timeout, is tests/long
(`make test-long`); these pin how the copies are settled and how the prefetch counts them.
"""

import asyncio
from typing import NamedTuple

import orjson
import pytest

from guillotina_amqp import add_task, recycling
from guillotina_amqp.redelivery import Redeliveries
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.utils import admin_channel, all_empty, logged, publish_raw, running_worker, wait_for

KEY = ("task-1", "run-1")


class Channel:
    def __init__(self) -> None:
        self.is_open = True


class Delivery(NamedTuple):
    channel: Channel


def started(redeliveries: Redeliveries, delivery: Delivery, disposition: str):
    """The original's run, ending with `disposition` once `end` is set."""
    end = asyncio.Event()

    async def decided() -> str:
        await end.wait()
        return disposition

    return end, asyncio.ensure_future(redeliveries.run(KEY, delivery, decided()))


async def kept(redeliveries: Redeliveries, delivery: Delivery):
    copy = asyncio.ensure_future(redeliveries.hold(KEY, "Task task-1", delivery, "ack"))
    await asyncio.sleep(0)  # the copy registers
    return copy


async def test_a_copy_takes_over_the_disposition_its_closed_original_cannot_apply(info_logs):
    redeliveries: Redeliveries[str] = Redeliveries("leave")
    old, new = Channel(), Channel()
    end, original = started(redeliveries, Delivery(old), "delay")
    await asyncio.sleep(0)
    old.is_open = False  # RabbitMQ closed it (consumer_timeout) and requeued the message
    assert redeliveries.running(KEY)
    copy = await kept(redeliveries, Delivery(new))
    assert not copy.done()  # kept aside while the run goes on
    end.set()
    assert await original == "leave"  # nothing to do on the closed channel
    assert await copy == "delay"  # the copy carries the run's disposition
    assert not redeliveries.running(KEY)
    assert sum("delivered again while this worker runs it" in r.getMessage() for r in info_logs.records) == 1


async def test_a_duplicate_of_a_run_settled_on_its_own_channel_is_acked():
    redeliveries: Redeliveries[str] = Redeliveries("leave")
    channel = Channel()
    end, original = started(redeliveries, Delivery(channel), "dead-letter")
    await asyncio.sleep(0)
    copy = await kept(redeliveries, Delivery(channel))
    end.set()
    assert await original == "dead-letter"
    assert await copy == "ack"


async def test_only_the_newest_open_copy_takes_over_and_one_line_is_logged(info_logs):
    redeliveries: Redeliveries[str] = Redeliveries("leave")
    first, second, third = Channel(), Channel(), Channel()
    end, original = started(redeliveries, Delivery(first), "ack")
    await asyncio.sleep(0)
    first.is_open = False
    older = await kept(redeliveries, Delivery(second))
    second.is_open = False  # the copy timed out in turn: RabbitMQ delivers it again
    newer = await kept(redeliveries, Delivery(third))
    end.set()
    assert await original == "leave"
    assert await older == "leave"  # gone with its channel
    assert await newer == "ack"
    assert sum("delivered again" in r.getMessage() for r in info_logs.records) == 1


async def test_copies_of_an_interrupted_run_stay_unacked():
    redeliveries: Redeliveries[str] = Redeliveries("leave")
    old, new = Channel(), Channel()
    _, original = started(redeliveries, Delivery(old), "ack")
    await asyncio.sleep(0)
    old.is_open = False
    copy = await kept(redeliveries, Delivery(new))
    original.cancel()  # the worker stops
    await asyncio.gather(original, return_exceptions=True)
    assert await copy == "leave"
    assert not redeliveries.running(KEY)


async def test_the_prefetch_counts_runs_on_closed_channels_and_copies_kept_aside():
    redeliveries: Redeliveries[str] = Redeliveries("leave")
    old, new = Channel(), Channel()
    end, original = started(redeliveries, Delivery(old), "ack")
    await asyncio.sleep(0)
    assert redeliveries.prefetch(4, old) == 4
    old.is_open = False
    assert redeliveries.prefetch(4, new) == 3  # the run keeps its slot
    assert redeliveries.prefetch(1, new) == 1  # never 0: RabbitMQ reads it as no limit
    copy = await kept(redeliveries, Delivery(new))
    assert redeliveries.prefetch(4, new) == 4  # the copy takes no slot
    end.set()
    await asyncio.gather(original, copy)
    assert redeliveries.prefetch(4, new) == 4


# -- on the tests' RabbitMQ: a channel closed under a running task, as consumer_timeout does --


async def main_queue() -> dict:
    async with admin_channel() as channel:
        return await channel.queue_declare(get_settings().queue, passive=True)


async def take_one() -> bool:
    """Take a ready message off the main queue, as another worker would."""
    async with admin_channel() as channel:
        return bool(await channel.basic_get(get_settings().queue, no_ack=True))


@pytest.mark.usefixtures("outside_container")
async def test_the_prefetch_counts_a_run_whose_channel_closed(guillotina_main, tmp_path, info_logs):
    go_long, go_short = tmp_path / "go-long", tmp_path / "go-short"
    async with running_worker(max_size=2) as worker:
        long = await add_task(app.until_exists, str(go_long), 120)
        await wait_for(lambda: worker.num_running == 1, what="the long task to start")
        # the copy RabbitMQ requeues goes elsewhere: the worker stops consuming, the test takes it
        worker.gate.hold(recycling.LOAD)
        await wait_for(lambda: main_queue_has(consumers=0), what="the worker to stop consuming")
        assert worker._channel is not None
        await worker._channel.close()  # what RabbitMQ does at consumer_timeout
        await wait_for(take_one, what="the requeued message")
        shorts = [await add_task(app.until_exists, str(go_short), 120) for _ in range(3)]
        worker.gate.hold(recycling.LOAD, held=False)

        # one slot left: the new channel takes one short task and leaves two in the queue
        await wait_for(lambda: worker.num_running == 2, what="a short task to start")
        assert (await main_queue())["message_count"] == 2
        go_long.touch()
        assert (await long.join(timeout=60))["status"] == TaskStatus.FINISHED
        # its slot is back: the prefetch is raised again
        await wait_for(lambda: main_queue_has(ready=1), what="a second short task")
        go_short.touch()
        for short in shorts:
            assert (await short.join(timeout=60))["status"] == TaskStatus.FINISHED

    assert logged(info_logs, "ack lost, its channel closed (RabbitMQ requeued it then)") == 1
    assert logged(info_logs, "will redeliver") == 0


async def main_queue_has(consumers: int | None = None, ready: int | None = None) -> bool:
    found = await main_queue()
    return (consumers is None or found["consumer_count"] == consumers) and (
        ready is None or found["message_count"] == ready
    )


@pytest.mark.usefixtures("outside_container")
async def test_a_later_run_of_a_task_this_worker_runs_says_whose_lock_it_waits_for(
    guillotina_main, tmp_path, info_logs
):
    go = tmp_path / "go"
    async with running_worker() as worker:
        state = await add_task(app.until_exists, str(go), 120)
        await wait_for(lambda: worker.num_running == 1, what="the task to start")
        later = dict((await state.get_state())["job_data"])
        clock, _, suffix = later["run"].partition("-")
        later["run"] = f"{int(clock) + 1:020d}-{suffix}"  # a later run of the same id, made meanwhile
        await publish_raw(orjson.dumps(later))
        await wait_for(
            lambda: logged(info_logs, state.task_id, "locked by this worker, which runs an earlier run"),
            what="the later run to wait for the lock",
        )
        assert logged(info_logs, state.task_id, "locked by another worker") == 0
        go.touch()
        await wait_for(all_empty, timeout=60, what="both runs to end")
