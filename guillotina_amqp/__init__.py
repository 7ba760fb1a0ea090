"""guillotina_amqp: run asyncio tasks on worker processes through RabbitMQ.

Add "guillotina_amqp" to `applications`, configure the `amqp` block, then
`await add_task(func, ...)` (or a `@task` function) and run `g amqp-worker`.
"""

import copy
from typing import Any

from guillotina import configure

from guillotina_amqp.decorators import object_task, task
from guillotina_amqp.http_tasks import add_http_task
from guillotina_amqp.offload import TaskContext, get_task_context
from guillotina_amqp.periodic_tasks import periodic
from guillotina_amqp.settings import DEFAULTS, AMQPSettings
from guillotina_amqp.utils import add_object_task, add_task, cancel_task

__all__ = [
    "TaskContext",
    "add_http_task",
    "add_object_task",
    "add_task",
    "cancel_task",
    "get_task_context",
    "object_task",
    "periodic",
    "task",
]

# Every default, visible in app_settings["amqp"] (guillotina merges the configuration's
# block over it). Only where the add-on is not loaded, or `amqp: null`, is there no block:
# add_task() is then a logged no-op (docs/design.md#public-api).
app_settings: dict[str, Any] = {
    "amqp": copy.deepcopy(DEFAULTS),
    "redis_prefix_key": AMQPSettings.redis_prefix_key,
    "commands": {
        "amqp-worker": "guillotina_amqp.commands.worker.WorkerCommand",
        "amqp-tasks": "guillotina_amqp.commands.tasks.TasksCommand",
    },
}


def includeme(root: Any, settings: dict[str, Any]) -> None:
    configure.scan("guillotina_amqp.permissions")
    configure.scan("guillotina_amqp.api")
    configure.scan("guillotina_amqp.dashboard")
    configure.scan("guillotina_amqp.state.memory")
    configure.scan("guillotina_amqp.state.redis")
