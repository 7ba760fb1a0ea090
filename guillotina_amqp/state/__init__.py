"""Task state: statuses, the TaskState handle and the state managers (SPEC §1, §5)."""

from guillotina_amqp.state.manager import Claim, StateManager, get_state_manager
from guillotina_amqp.state.status import TaskStatus
from guillotina_amqp.state.task_state import TaskState

__all__ = ["Claim", "StateManager", "TaskState", "TaskStatus", "get_state_manager"]
