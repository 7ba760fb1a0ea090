"""What the worker asks of a state manager beyond the original's, and how to find one."""

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

import orjson
from guillotina.component import query_utility
from zope.interface import implementer

from guillotina_amqp.exceptions import StateManagerUnavailable
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.names import check_task_id
from guillotina_amqp.settings import AMQPSettings, get_settings
from guillotina_amqp.state.operations import Operations
from guillotina_amqp.state.status import TaskStatus

logger = logging.getLogger("guillotina_amqp")

# claim() outcomes
CLAIMED = "claimed"
CANCELED = "canceled"
DONE = "done"
LOCKED = "locked"
STALE = "stale"  # the message is of an earlier run than the state's


@dataclass
class Claim:
    """What claiming a delivered task found: one of CLAIMED, CANCELED, DONE, LOCKED, STALE.

    `status` is the ended run's status for DONE; `crashes` how often, for CLAIMED, a worker
    running the task died before it ended (this claim's discovery included).
    """

    outcome: str
    job_retries: int = 0
    status: str | None = None
    crashes: int = 0


def initial_state(run: str = "") -> dict[str, Any]:
    """The state of a task just scheduled; `run` tells this run from earlier ones of the same id."""
    state = {"status": TaskStatus.SCHEDULED, "eventlog": [], "job_retries": 0, "updated": time.time()}
    if run:
        state["run"] = run
    return state


def is_valid_task_id(task_id: Any) -> bool:
    """Whether reading `task_id` may find a task (never a bookkeeping key)."""
    try:
        check_task_id(task_id)
    except ValueError:
        return False
    return True


def legacy_state(raw: bytes, task_id: str) -> dict[str, Any]:
    """The state the original plugin wrote (one JSON object), as our state dict."""
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        state = None
    if not isinstance(state, dict):
        logger.warning("Task %s: unreadable state left by the original plugin; starting it afresh", task_id)
        state = {}
    state.setdefault("status", TaskStatus.SCHEDULED)
    eventlog = state.get("eventlog")
    state["eventlog"] = eventlog if isinstance(eventlog, list) else []
    return state


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
    """The original's interface plus the atomic steps the worker's hot path needs (one round trip each),
    and the operations' index and presence (docs/design.md#state-in-redis)."""

    def __init__(self) -> None:
        self.worker_id = uuid.uuid4().hex

    @property
    def state_ttl(self) -> int:
        return get_settings().state_ttl

    # -- hot path ---------------------------------------------------------
    @abc.abstractmethod
    async def next_run(self, task_id: str) -> str:
        """A new run id for `task_id`, later than any stored run of it, by the store's own clock
        (guillotina_amqp.runs): what add_task and retry put in the message before publishing."""

    @abc.abstractmethod
    async def create(self, task_id: str, data: dict[str, Any]) -> bool:
        """Store `data` as the task's state (without expiry: the task is live) unless a state
        of the same or a later run (`data["run"]`) exists; return whether it did. A state of
        an earlier run, ended or not, is replaced: a reused task id runs again."""

    @abc.abstractmethod
    async def claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None = None) -> Claim:
        """Atomically, for the run `job_data["run"]`: RunFromTheFuture if no store could have made
        that run yet (a forgery); STALE if the state is of a later run;
        start the state afresh for a later run (unless an earlier one holds the lock:
        LOCKED); record `scheduled` if new; if the run ended report DONE (and drop any late
        cancel); if locked report LOCKED (a cancel stays for the lock holder); if in the
        cancel set mark it canceled; else take the lock, store `job_data` and mark the
        task running, its state kept without expiry while it is live."""

    @abc.abstractmethod
    async def finish(
        self,
        task_id: str,
        data: dict[str, Any],
        ttl: int | None,
        owner: str | None = None,
        run: str | None = None,
        only_open: bool = False,
    ) -> bool:
        """Merge the outcome into the state, expire it after `ttl` (None: keep), release our lock.

        Writes nothing (False) when `run` is given and the state is another run's, or when
        `only_open` and the run already ended.
        """

    @abc.abstractmethod
    async def append_event(self, task_id: str, entry: list, limit: int) -> None:
        """Add `entry` to the task's event log, keeping the last `limit` entries."""

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

    async def _clean(self) -> None:
        """Forget every task, lock, cancellation and index entry under this manager's prefix.

        For tests (the original plugin's suites call it between cases); never for production.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be cleaned")

    async def adopt_legacy(self) -> None:
        """Take over (and index) every state the original plugin left; a no-op where there is none."""

    # -- periodic tasks (docs/design.md#periodic-tasks) -------------------
    @abc.abstractmethod
    async def claim_period(self, name: str, period: int, ttl: float, token: str) -> bool:
        """Whether we (`token`) are the one worker firing periodic task `name` for `period`:
        the first caller wins, for `ttl` seconds; asking again with the same token says yes."""

    @abc.abstractmethod
    async def release_period(self, name: str, period: int) -> None:
        """Give a claimed period back (firing it failed): another worker may fire it."""

    # -- IStateManagerUtility, as the original plugin had it --------------
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


def get_state_manager(loop: asyncio.AbstractEventLoop | None = None) -> StateManager:
    """The IStateManagerUtility named by `amqp.persistent_manager`.

    `loop` is accepted for the original plugin's callers and ignored: the managers
    work on whichever loop runs the call.
    """
    return manager_for(get_settings())


def manager_for(settings: AMQPSettings) -> StateManager:
    """The state manager `settings` name (get_state_manager for a caller holding them already)."""
    name = settings.persistent_manager
    manager = query_utility(IStateManagerUtility, name=name)
    if manager is None:
        raise StateManagerUnavailable(
            f"amqp.persistent_manager={name!r}: no state manager of that name (use 'memory' or 'redis')"
        )
    return manager
