"""Broker and Redis faults: publisher confirms, dropped connections and channels, a Redis outage.

Connections are closed by RabbitMQ itself (`rabbitmqctl close_connection`), found by the
connection_name our clients announce; Redis outages use a redis-server of the test's own.
"""

import asyncio
import subprocess
import uuid

import aioamqp
import orjson
import pytest

from guillotina_amqp import add_task
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.exceptions import MessageNotRouted
from guillotina_amqp.publishing import Publisher, get_publisher
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskStatus, get_state_manager
from tests import app
from tests.own_redis import OWN_REDIS
from tests.utils import admin_channel, lines, logged, publish_raw, queue_counts, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container", "info_logs")


async def counts() -> list[int]:
    """[main, delay, error] messages ready."""
    return list((await queue_counts()).values())


async def all_empty() -> bool:
    return await counts() == [0, 0, 0]


# -- the broker closes connections ---------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def connections_named(connection_name: str) -> list[str]:
    """Pids of RabbitMQ's open connections announcing `connection_name` in their client_properties."""
    listing = await rabbitmqctl("list_connections", "pid", "client_properties")
    return [line.split("\t")[0] for line in listing.splitlines() if f'"{connection_name}"' in line]


async def close_connection(connection_name: str) -> str:
    """Have RabbitMQ close our one connection of that name; return its pid."""
    found = await connections_named(connection_name)
    assert len(found) == 1, found
    await rabbitmqctl("close_connection", found[0], "closed by a test")
    return found[0]


async def reconnected(connection_name: str, old: str) -> bool:
    found = await connections_named(connection_name)
    return len(found) == 1 and found[0] != old


async def test_worker_reconnects_after_the_broker_closes_its_connection(worker, tmp_path, caplog):
    marker = tmp_path / "runs"
    running = await add_task(app.sleep_then_mark, str(marker), 2)
    await wait_for(lambda: lines(marker) == ["started"], what="the task to start")

    old = await close_connection(worker.connection_name)
    await wait_for(
        lambda: reconnected(worker.connection_name, old), timeout=60, what="a new worker connection"
    )

    # the task running meanwhile finishes once (its redelivery finds it locked or done)
    final = await asyncio.wait_for(running.join(), 60)
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, "done")
    # and the worker keeps consuming on the new connection
    after = await asyncio.wait_for((await add_task(app.add, 2, 3)).join(), 60)
    assert (after["status"], after["result"]) == (TaskStatus.FINISHED, 5)
    await wait_for(all_empty, timeout=60, what="the redelivery to be settled")
    assert lines(marker) == ["started", "done"]
    assert logged(caplog, "lost its RabbitMQ connection") == 1


# a delay long enough to see what waits in the delay queue
@pytest.mark.app_settings({"amqp": {"max_task_retries": 1, "delayed_ttl_ms": 3000}})
async def test_task_failing_while_disconnected_is_retried_once_not_twice(worker, tmp_path, caplog):
    marker, go = tmp_path / "runs", tmp_path / "go"
    state = await add_task(app.fail_when_told, str(marker), str(go))
    await wait_for(lambda: lines(marker) == ["started"], what="the task to start")
    await close_connection(worker.connection_name)
    # the broker redelivers it at once; the worker, still running it, keeps the copy aside
    redelivered = (state.task_id, "delivered again while this worker runs it")
    await wait_for(lambda: logged(caplog, *redelivered) == 1, timeout=60, what="the redelivery")

    go.touch()  # now the first run fails: its copy, not the lost original, goes to the delay queue
    await wait_for(lambda: worker.num_running == 0, what="the first run to end")
    await worker.join()
    assert await counts() == [0, 1, 0]  # one copy waits to be retried, not two

    await wait_for(lambda: _dead_lettered(), timeout=60, what="the retry to fail into the error queue")
    await worker.join()
    assert await counts() == [0, 0, 1]
    assert lines(marker) == ["started", "started"]
    assert (await state.get_state())["status"] == TaskStatus.ERRORED


async def _dead_lettered() -> bool:
    return (await counts())[2] >= 1


async def test_worker_consumes_again_when_only_its_channel_closes(worker, caplog):
    assert worker.connection is not None and worker._channel is not None
    closed = worker._channel
    # acking a delivery tag the broker never sent makes it close the channel, not the connection
    await closed.basic_client_ack(delivery_tag=987654)
    await wait_for(lambda: not closed.is_open, what="the broker to close the channel")
    assert worker.connection.is_open

    final = await asyncio.wait_for((await add_task(app.add, 1, 1)).join(), 60)
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 2)
    assert logged(caplog, "lost its RabbitMQ channel") == 1


async def test_worker_declares_its_queues_again_when_they_are_deleted(worker, caplog):
    await delete_queues()

    # its consumer cancelled by the broker, the worker declares the topology and consumes again
    await wait_for(lambda: logged(caplog, "lost its RabbitMQ consumer") >= 1, what="the worker to notice")
    await wait_for(lambda: logged(caplog, "set up again") >= 1, what="the worker to consume again")
    final = await asyncio.wait_for((await add_task(app.add, 4, 4)).join(), 60)
    assert final["result"] == 8
    assert logged(caplog, "lost its RabbitMQ consumer") == 1


async def delete_queues() -> None:
    """Delete the main, delay and error queues, as an operator could."""
    settings = get_settings()
    async with admin_channel() as channel:
        for queue in (settings.queue, f"{settings.queue}-delay", f"{settings.queue}-error"):
            await channel.queue_delete(queue)


# -- publishing: confirms, reconnects, retries ---------------------------------------


async def test_add_task_reconnects_after_the_broker_dropped_its_connection(guillotina_main):
    first = await add_task(app.noop)
    publisher = get_publisher(get_settings())
    name = publisher.connection.name
    old = await close_connection(name)
    # the connection comes back by itself (no publish needed to notice)
    await wait_for(lambda: reconnected(name, old), timeout=60, what="a new publisher connection")

    second = await add_task(app.noop)

    assert await counts() == [2, 0, 0]  # both confirmed in the queue, none lost
    assert (await connections_named(name)) != [old]
    for state in (first, second):
        assert await state.get_status() == TaskStatus.SCHEDULED


async def test_add_task_retries_a_closed_channel_then_raises(guillotina_main, monkeypatch):
    attempts = []

    async def closed_channel(self, *args, **kwargs):
        attempts.append(1)
        raise aioamqp.ChannelClosed(code=504, message="CHANNEL_ERROR")

    monkeypatch.setattr(aioamqp.channel.Channel, "publish", closed_channel)
    task_id = str(uuid.uuid4())
    with pytest.raises(aioamqp.ChannelClosed):
        await add_task(app.noop, _retries=2, _task_id=task_id)

    assert len(attempts) == 3  # the first try and `_retries` more, each on a new channel
    assert await get_state_manager().exists(task_id) is False  # never recorded as scheduled
    monkeypatch.undo()
    assert await counts() == [0, 0, 0]


async def test_add_task_survives_one_closed_channel(guillotina_main, monkeypatch):
    original = aioamqp.channel.Channel.publish
    channels = []

    async def first_channel_closed(self, *args, **kwargs):
        channels.append(self)
        if len(channels) == 1:
            raise aioamqp.ChannelClosed(code=504, message="CHANNEL_ERROR")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(aioamqp.channel.Channel, "publish", first_channel_closed)
    state = await add_task(app.noop, _retries=1)
    assert len(channels) == 2 and channels[0] is not channels[1]
    assert await state.get_status() == TaskStatus.SCHEDULED
    assert await counts() == [1, 0, 0]


async def test_publish_waits_for_the_broker_confirm(guillotina_main):
    """A message the broker refuses (basic.nack) raises instead of passing for published."""
    settings = get_settings()
    full = f"{settings.queue}-full"
    declaring = AMQPConnection(settings)
    await declaring.open(max_time=10)
    publisher = Publisher(settings)
    try:
        channel = await declaring.channel()
        arguments = {"x-max-length": 0, "x-overflow": "reject-publish"}
        await channel.queue_declare(full, exclusive=True, arguments=arguments)
        await channel.queue_bind(full, settings.exchange, routing_key=full)

        await publisher.publish(b"{}", settings.queue)  # confirmed: returns
        assert publisher._channel is not None and publisher._channel.publisher_confirms
        with pytest.raises(aioamqp.exceptions.PublishFailed):
            await publisher.publish(b"{}", full)
    finally:
        await publisher.close()
        await declaring.close()


async def test_add_task_declares_a_deleted_queue_again_instead_of_losing_the_task(guillotina_main):
    await add_task(app.noop)  # the publisher declared the queues on connecting
    await delete_queues()

    state = await add_task(app.noop)

    assert await counts() == [1, 0, 0]  # routed, not confirmed into the void
    assert await state.get_status() == TaskStatus.SCHEDULED


async def test_publish_to_a_routing_key_without_queue_raises(guillotina_main):
    publisher = Publisher(get_settings())
    try:
        with pytest.raises(MessageNotRouted):
            await publisher.publish(b"{}", "no-queue-has-this-name")
    finally:
        await publisher.close()


# -- Redis goes away for a while -----------------------------------------------------------


@OWN_REDIS
async def test_redis_outage_loses_no_task_and_leaves_none_running(
    own_redis, guillotina_main, tmp_path, caplog
):
    marker, late = tmp_path / "runs", tmp_path / "late"
    async with running_worker():
        running = await add_task(app.sleep_then_mark, str(marker), 1)
        await wait_for(lambda: lines(marker) == ["started"], what="the task to start")

        own_redis.stop()
        # while Redis is down: the running task ends, and a new one is delivered
        late_id = str(uuid.uuid4())
        await publish_raw(
            orjson.dumps({"func": "tests.app.write_marker", "args": [str(late)], "task_id": late_id})
        )
        await wait_for(lambda: "done" in lines(marker), what="the running task to end")
        await wait_for(lambda: logged(caplog, "Backing off") >= 2, what="the worker to retry Redis")
        own_redis.start()

        manager = get_state_manager()
        for task_id in (running.task_id, late_id):
            await wait_for(lambda: _finished(manager, task_id), timeout=60, what=f"{task_id} to finish")
        await wait_for(all_empty, timeout=60, what="every queue to be empty")

    assert (await running.get_state())["result"] == "done"
    assert lines(marker) == ["started", "done"]
    assert lines(late) == ["ran"]


async def _finished(manager, task_id: str) -> bool:
    return (await manager.get(task_id)).get("status") == TaskStatus.FINISHED
