"""update_task_*: write one status into a task's state (names kept from the original plugin).

The worker records its transitions atomically through `StateManager.claim`/`finish`;
these helpers are for code of the original's era that sets a status by hand (a
custom worker, a test seeding a state). Each merges the status, its fields and the
`updated` time into the state with `state_manager.update`.
"""

import time
import traceback
from typing import Any

from guillotina_amqp.state.manager import StateManager
from guillotina_amqp.state.status import TaskStatus


async def _write(state_manager: StateManager, task_id: str, status: str, **fields: Any) -> None:
    await state_manager.update(task_id, {"status": status, **fields, "updated": time.time()})


async def update_task_scheduled(
    state_manager: StateManager, task_id: str, eventlog: list | None = None
) -> None:
    """Status `scheduled`, with an empty (or the given) event log."""
    await _write(state_manager, task_id, TaskStatus.SCHEDULED, eventlog=eventlog or [])


async def update_task_running(state_manager: StateManager, task_id: str) -> None:
    await _write(state_manager, task_id, TaskStatus.RUNNING)


async def update_task_finished(state_manager: StateManager, task_id: str, result: Any = None) -> None:
    await _write(state_manager, task_id, TaskStatus.FINISHED, result=result)


async def update_task_errored(state_manager: StateManager, task_id: str, error: str | None = None) -> None:
    """Status `errored`; `error` defaults to the traceback of the exception being handled."""
    await _write(state_manager, task_id, TaskStatus.ERRORED, error=error or traceback.format_exc())


async def update_task_canceled(state_manager: StateManager, task_id: str) -> None:
    await _write(state_manager, task_id, TaskStatus.CANCELED)
