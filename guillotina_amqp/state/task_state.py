"""TaskState: a handle on one task's state (docs/design.md#public-api)."""

import asyncio
from typing import Any, Callable

from guillotina_amqp.exceptions import (
    TaskAlreadyAcquired,
    TaskCanceled,
    TaskErrored,
    TaskNotFinishedException,
    TaskNotFoundException,
)
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

    async def join(self, wait: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the task is finished, errored or canceled; return its state.

        Woken by state changes as they happen; `wait` bounds each wait between re-reads.
        asyncio.TimeoutError after `timeout` seconds (None: wait for ever).
        """
        return await asyncio.wait_for(self._wait(_stopped, wait), timeout)

    async def result(self, timeout: float | None = None) -> Any:
        """The task's result once it ended for good (an errored run that will be retried
        is waited through). TaskErrored (its message the stored error, the remote
        traceback) if it failed, TaskCanceled if canceled, asyncio.TimeoutError
        after `timeout` seconds."""
        state = await asyncio.wait_for(self._wait(_ended, 0.5), timeout)
        if state["status"] == TaskStatus.ERRORED:
            raise TaskErrored(state.get("error") or f"task {self.task_id} errored")
        if state["status"] == TaskStatus.CANCELED:
            raise TaskCanceled(state.get("error") or f"task {self.task_id} was canceled")
        return state.get("result")

    async def _wait(self, until: Callable[[dict[str, Any]], bool], wait: float) -> dict[str, Any]:
        manager = self._manager
        async with manager.watch(self.task_id) as watch:
            while True:
                state = await manager.get(self.task_id)
                if not state:
                    raise TaskNotFoundException(self.task_id)
                if until(state):
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


def _stopped(state: dict[str, Any]) -> bool:
    return state.get("status") in FINAL_STATUSES


def _ended(state: dict[str, Any]) -> bool:
    """Stopped for good: an errored run of ours waiting for its retry has no `ended` yet
    (states of the original plugin carry no `run` and are taken as they are)."""
    if state.get("status") == TaskStatus.ERRORED and state.get("run"):
        return state.get("ended") is not None
    return _stopped(state)
