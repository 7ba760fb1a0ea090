"""An application's test module, written as it was against the original plugin.

Its fixtures come from `guillotina_amqp.tests.fixtures` (as an application's conftest
would load them); tasks go through RabbitMQ and state through Redis.
"""

import uuid

import orjson

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from tests.app import add
from tests.utils import wait_for

pytest_plugins = ["guillotina_amqp.tests.fixtures"]


async def test_a_scheduled_task_runs_on_amqp_worker(amqp_worker):
    state = await add_task(add, 2, 3)
    final = await state.join()
    assert final["status"] == TaskStatus.FINISHED and final["result"] == 5
    assert amqp_worker.total_run == 1


async def test_a_message_published_on_amqp_channel_runs_on_amqp_worker(amqp_worker, amqp_channel):
    task_id = str(uuid.uuid4())
    body = {"func": "tests.app.add", "args": [1, 1], "kwargs": {}, "task_id": task_id, "req_data": {}}
    await amqp_channel.publish(orjson.dumps(body), amqp_worker.settings.exchange, amqp_worker.queue_main)
    # no add_task recorded it: its state exists once the worker claimed it
    await wait_for(lambda: get_state_manager().exists(task_id), what="the worker to claim it")
    final = await TaskState(task_id).join()
    assert final["status"] == TaskStatus.FINISHED and final["result"] == 2
