"""Task state: statuses, the TaskState handle and the state managers (docs/design.md#state-in-redis)."""

from guillotina_amqp.state.manager import Claim, StateManager, get_state_manager
from guillotina_amqp.state.memory import MemoryStateManager
from guillotina_amqp.state.redis import RedisStateManager
from guillotina_amqp.state.status import TaskStatus
from guillotina_amqp.state.task_state import TaskState
from guillotina_amqp.state.updates import (
    update_task_canceled,
    update_task_errored,
    update_task_finished,
    update_task_running,
    update_task_scheduled,
)

__all__ = [
    "Claim",
    "MemoryStateManager",
    "RedisStateManager",
    "StateManager",
    "TaskState",
    "TaskStatus",
    "get_state_manager",
    "update_task_canceled",
    "update_task_errored",
    "update_task_finished",
    "update_task_running",
    "update_task_scheduled",
]
