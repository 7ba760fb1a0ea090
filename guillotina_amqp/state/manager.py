"""What the worker asks of a state manager beyond SPEC §5, and how to find one."""

import abc
import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable

from guillotina.component import query_utility
from zope.interface import implementer

from guillotina_amqp.exceptions import StateManagerUnavailable
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.operations import Operations
from guillotina_amqp.state.status import TaskStatus

# claim() outcomes
CLAIMED = "claimed"
CANCELED = "canceled"
DONE = "done"
LOCKED = "locked"


@dataclass
class Claim:
    """What claiming a delivered task found: one of CLAIMED, CANCELED, DONE, LOCKED."""

    outcome: str
    job_retries: int = 0
    eventlog: list = field(default_factory=list)


def initial_state() -> dict[str, Any]:
    return {"status": TaskStatus.SCHEDULED, "eventlog": [], "job_retries": 0, "updated": time.time()}


class Watch:
    """Wakes a waiter when a task's state changes (no polling)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return on the next change, or after `timeout` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()


@implementer(IStateManagerUtility)
class StateManager(Operations, abc.ABC):
    """SPEC §5 plus the atomic steps the worker's hot path needs (one round trip each),
    and the operations' index and presence (SPEC §13)."""

    def __init__(self) -> None:
        self.worker_id = uuid.uuid4().hex

    @property
    def state_ttl(self) -> int:
        return get_settings().state_ttl

    # -- hot path ---------------------------------------------------------
    @abc.abstractmethod
    async def create(self, task_id: str, data: dict[str, Any]) -> bool:
        """Store `data` as the task's state unless a state exists; return whether it did."""

    @abc.abstractmethod
    async def claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None = None) -> Claim:
        """Atomically: record `scheduled` if new; if finished/canceled report DONE (and drop
        any late cancel); if locked report LOCKED (a cancel stays for the lock holder); if
        in the cancel set mark it canceled; else take the lock, store `job_data` and mark
        the task running."""

    @abc.abstractmethod
    async def finish(
        self, task_id: str, data: dict[str, Any], ttl: int | None, owner: str | None = None
    ) -> None:
        """Merge the outcome into the state, expire it after `ttl`, release our lock."""

    @abc.abstractmethod
    async def canceled_among(self, task_ids: Iterable[str]) -> set[str]:
        """Which of `task_ids` are in the cancel set (one round trip)."""

    @abc.abstractmethod
    async def refresh_locks(self, task_ids: Iterable[str], ttl: int, owner: str | None = None) -> None:
        """Extend the locks we hold on `task_ids`."""

    @abc.abstractmethod
    def watch(self, task_id: str) -> contextlib.AbstractAsyncContextManager[Watch]:
        """Context in which `wait()` returns when the task's state changes."""

    async def finalize(self) -> None:
        """Drop connections and background listeners."""

    # -- SPEC §5 ------------------------------------------------------------
    @abc.abstractmethod
    async def update(self, task_id: str, data: dict[str, Any], ttl: int | None = None) -> None: ...

    @abc.abstractmethod
    async def get(self, task_id: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def exists(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def acquire(self, task_id: str, ttl: int) -> bool: ...

    @abc.abstractmethod
    async def is_locked(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    async def is_mine(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    async def release(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    async def refresh_lock(self, task_id: str, ttl: int) -> bool: ...

    @abc.abstractmethod
    async def cancel(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    def cancelation_list(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def clean_canceled(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    async def is_canceled(self, task_id: str) -> bool: ...


def get_state_manager() -> StateManager:
    """The IStateManagerUtility named by `amqp.persistent_manager`."""
    name = get_settings().persistent_manager
    manager = query_utility(IStateManagerUtility, name=name)
    if manager is None:
        raise StateManagerUnavailable(
            f"amqp.persistent_manager={name!r}: no state manager of that name (use 'memory' or 'redis')"
        )
    return manager
