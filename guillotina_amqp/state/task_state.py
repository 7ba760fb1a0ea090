"""TaskState: a handle on one task's state (SPEC §1)."""

from typing import Any

from guillotina_amqp.exceptions import TaskAlreadyAcquired, TaskNotFinishedException, TaskNotFoundException
from guillotina_amqp.state.manager import StateManager, get_state_manager
from guillotina_amqp.state.status import FINAL_STATUSES, TaskStatus


class TaskState:
    """Read, wait for, lock or cancel the task `task_id`.

    Every call reads the shared state manager; unknown ids raise
    TaskNotFoundException.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __repr__(self) -> str:
        return f"<TaskState {self.task_id}>"

    @property
    def _manager(self) -> StateManager:
        return get_state_manager()

    async def get_state(self) -> dict[str, Any]:
        """The whole state dict (status, result, error, eventlog, job_retries, ...)."""
        state = await self._manager.get(self.task_id)
        if not state:
            raise TaskNotFoundException(self.task_id)
        return state

    async def get_status(self) -> str | None:
        return (await self.get_state()).get("status")

    async def get_result(self) -> Any:
        """The result of a finished or errored task; TaskNotFinishedException before that."""
        state = await self.get_state()
        if state.get("status") not in (TaskStatus.FINISHED, TaskStatus.ERRORED):
            raise TaskNotFinishedException(self.task_id)
        return state.get("result")

    async def join(self, wait: float = 0.5) -> dict[str, Any]:
        """Wait until the task is finished, errored or canceled; return its state.

        Woken by state changes as they happen; `wait` bounds each wait between re-reads.
        """
        manager = self._manager
        async with manager.watch(self.task_id) as watch:
            while True:
                state = await manager.get(self.task_id)
                if not state:
                    raise TaskNotFoundException(self.task_id)
                if state.get("status") in FINAL_STATUSES:
                    return state
                await watch.wait(wait)

    async def cancel(self) -> bool:
        """Ask workers to cancel the task: True (also when already canceled or finished)."""
        state = await self.get_state()
        if state.get("status") in FINAL_STATUSES - {TaskStatus.ERRORED}:
            return True
        return await self._manager.cancel(self.task_id)

    async def is_canceled(self) -> bool:
        return await self._manager.is_canceled(self.task_id)

    async def acquire(self, ttl: int = 60) -> bool:
        """Take the task's lock for `ttl` seconds; False if another holder has it."""
        try:
            return await self._manager.acquire(self.task_id, ttl)
        except TaskAlreadyAcquired:
            return False

    async def refresh_lock(self, ttl: int = 60) -> bool:
        return await self._manager.refresh_lock(self.task_id, ttl)

    async def release(self) -> bool:
        return await self._manager.release(self.task_id)
