"""guillotina_amqp: run asyncio tasks on worker processes through RabbitMQ.

Add "guillotina_amqp" to `applications`, configure the `amqp` block, then
`await add_task(func, ...)` (or a `@task` function) and run `g amqp-worker`.
"""

from typing import Any

from guillotina import configure

from guillotina_amqp.decorators import object_task, task
from guillotina_amqp.utils import add_object_task, add_task, cancel_task

__all__ = ["add_object_task", "add_task", "cancel_task", "object_task", "task"]

# No "amqp" block here: without one in the configuration add_task() is a
# logged no-op (SPEC §1). Its defaults are guillotina_amqp.settings.DEFAULTS.
app_settings: dict[str, Any] = {
    "redis_prefix_key": "amqpjobs-",
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
