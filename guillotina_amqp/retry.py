"""Re-running an errored or canceled task under its own id (SPEC §13).

The stored message (`job_data`) is published again through the Publisher and the
state starts over as `scheduled`: no retries counted, no error, no event log.
"""

import time

from guillotina_amqp import message as messages
from guillotina_amqp.exceptions import TaskNotFoundException
from guillotina_amqp.publishing import get_publisher
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.manager import get_state_manager
from guillotina_amqp.state.status import TaskStatus

RETRYABLE = (TaskStatus.ERRORED, TaskStatus.CANCELED)


class RetryRefused(Exception):
    """The task cannot be re-run now; the message says why (HTTP 409, exit code 1)."""


async def retry_task(task_id: str) -> None:
    """Publish the task's stored message again; RetryRefused unless it is errored or canceled."""
    manager = get_state_manager()
    state = await manager.get(task_id)
    if not state:
        raise TaskNotFoundException(task_id)
    status = state.get("status")
    if status not in RETRYABLE:
        raise RetryRefused(f"task {task_id} is {status}: only errored or canceled tasks can be retried")
    job_data = state.get("job_data")
    if not job_data:
        raise RetryRefused(f"task {task_id} has no stored message to run again")
    if await manager.is_locked(task_id):
        raise RetryRefused(f"task {task_id} is still held by a worker; try again when it has let go")
    settings = get_settings()
    body = messages.encode({**job_data, "task_id": task_id})
    await manager.clean_canceled(task_id)  # else the worker would cancel the new run at once
    # scheduled before the message is out: the worker that takes it must not find it errored
    fresh = {"status": TaskStatus.SCHEDULED, "job_retries": 0, "error": None, "result": None}
    await manager.update(task_id, {**fresh, "eventlog": [], "updated": time.time()})
    try:
        await get_publisher(settings).publish(body, settings.queue)
    except Exception:
        await manager.update(task_id, {"status": status, "updated": time.time()})
        raise
