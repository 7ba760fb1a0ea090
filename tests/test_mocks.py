"""The mock connection factory (guillotina_amqp.tests.mocks): tasks run with no RabbitMQ at all.

`amqp.port` points at a port nothing listens on, so any real connection would fail.
"""

import aioamqp
import pytest

from guillotina_amqp import add_task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus
from guillotina_amqp.tests.mocks import get_broker
from tests.conftest import _hostport
from tests.utils import lines, running_worker, wait_for

pytest_plugins = ["guillotina_amqp.tests.fixtures"]

MOCK_BROKER = pytest.mark.app_settings(
    {"amqp": {"connection_factory": "guillotina_amqp.tests.mocks.connect", "host": "127.0.0.1", "port": 1}}
)
pytestmark = MOCK_BROKER


async def _finished(state: TaskState) -> bool:
    return await state.get_status() == TaskStatus.FINISHED


def task_messages() -> list:
    """What was published to the task exchange (beacons go to their own exchange)."""
    return [p for p in get_broker().published if p.exchange == get_settings().exchange]


async def _on_rabbitmq(queue: str) -> bool:
    """Whether the real RabbitMQ has `queue`."""
    host, port = _hostport("RABBITMQ")
    transport, protocol = await aioamqp.connect(host=host, port=port)
    try:
        await (await protocol.channel()).queue_declare(queue, passive=True)
        return True
    except aioamqp.ChannelClosed:
        return False
    finally:
        await protocol.close()
        transport.close()


@pytest.mark.parametrize("manager", ["memory", "redis"])
async def test_a_task_runs_end_to_end_without_rabbitmq(amqp_worker, manager):
    final = await (await add_task("tests.app.add", 20, 22)).join()

    assert final["status"] == TaskStatus.FINISHED and final["result"] == 42
    published = task_messages()
    assert [(p.exchange, p.routing_key) for p in published] == [
        (get_settings().exchange, get_settings().queue)
    ]
    assert published[0].json()["func"] == "tests.app.add"
    assert not await _on_rabbitmq(get_settings().queue)


async def test_messages_wait_in_the_mock_queue_until_a_worker_consumes(guillotina_main):
    state = await add_task("tests.app.add", 1, 2)
    queue = get_settings().queue
    assert get_broker().ready(queue) == [task_messages()[0].body]

    async with running_worker():
        final = await state.join()

    assert final["result"] == 3 and get_broker().ready(queue) == []


async def test_a_failed_task_is_retried_through_the_mock_delay_queue(amqp_worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task("tests.app.fail_until", str(marker), 1)

    await wait_for(lambda: _finished(state), what="the second run to finish")
    assert (await state.get_state())["job_retries"] == 1
    assert len(lines(marker)) == 2
    routing_keys = [p.routing_key for p in task_messages()]
    assert routing_keys == [get_settings().queue, f"{get_settings().queue}-delay"]


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
async def test_a_task_out_of_retries_lands_in_the_mock_error_queue(amqp_worker):
    state = await add_task("tests.app.fail", "no luck")
    final = await state.join()
    error_queue = f"{get_settings().queue}-error"

    await wait_for(lambda: get_broker().ready(error_queue), what="the message in the error queue")
    assert final["status"] == TaskStatus.ERRORED and "no luck" in final["error"]
    assert get_broker().ready(error_queue) == [task_messages()[0].body]


async def test_the_worker_consumes_again_after_the_mock_broker_drops_it(amqp_worker):
    get_broker().drop_connections()
    await wait_for(lambda: get_broker().queues[get_settings().queue].consumers, what="a consumer again")

    final = await (await add_task("tests.app.add", 2, 2)).join()

    assert final["result"] == 4


async def test_the_mock_refuses_what_rabbitmq_refuses(amqp_channel):
    queue = get_settings().queue
    with pytest.raises(aioamqp.ChannelClosed) as refused:
        await amqp_channel.queue_declare(queue, durable=True, arguments={"x-message-ttl": 1})
    assert refused.value.code == 406  # PRECONDITION_FAILED: declared with other arguments
    assert not amqp_channel.is_open


async def test_unacked_messages_are_redelivered_when_their_channel_closes(amqp_channel):
    delivered = []

    async def keep(channel, body, envelope, properties):
        delivered.append((channel, envelope.is_redeliver))

    queue = (await amqp_channel.queue_declare("", exclusive=True))["queue"]
    await amqp_channel.basic_consume(keep, queue_name=queue)
    await amqp_channel.publish(b"x", "", queue)
    await wait_for(lambda: delivered, what="the first delivery")
    second = await amqp_channel.protocol.channel()
    await second.basic_consume(keep, queue_name=queue)

    await amqp_channel.close()

    await wait_for(lambda: len(delivered) == 2, what="the redelivery")
    assert delivered[1] == (second, True)


@pytest.mark.usefixtures("outside_container")
async def test_retry_delays_go_through_a_delay_tier_on_the_mock_broker_too(amqp_worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task("tests.app.steer", str(marker), "retry", 0.3)

    assert await state.result(timeout=30) == 2
    tier = f"{get_settings().queue}-delay-337ms"  # 0.3 s rounded up to its tier
    assert [p.routing_key for p in task_messages()] == [get_settings().queue, tier]
