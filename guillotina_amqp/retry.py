"""Re-running an errored or canceled task under its own id (docs/operations.md#rest-api).

The stored message (`job_data`) is published again as a new run of the same id (a new
`run`): the state starts over as `scheduled` (no retries counted, no error, no event
log), and any copy of the old run still waiting (a retry in the delay queue) is skipped.
"""

from guillotina_amqp import message as messages
from guillotina_amqp import names, replay
from guillotina_amqp.exceptions import TaskNotFoundException
from guillotina_amqp.publishing import publish_task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.manager import get_state_manager, initial_state
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
    run = await manager.next_run(task_id)
    # issued now: the stored message's own issue time may be older than a replay may be
    message = replay.stamp({**job_data, "task_id": task_id, "run": run}, settings)
    body = messages.encode(message, settings)
    await manager.clean_canceled(task_id)  # else the worker would cancel the new run at once
    queue = names.task_queue(job_data.get("queue"), settings)
    # where add_task sent it: its priority queue, with its priority, for a task given one
    await publish_task(body, settings, queue, priority=job_data.get("priority"))
    await manager.create(task_id, initial_state(run) | {"job_data": message})
