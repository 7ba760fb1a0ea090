"""State kept in process memory, with the same semantics (TTLs included) as Redis."""

import contextlib
import time
from typing import Any, AsyncIterator, Iterable

import orjson
from guillotina import configure

from guillotina_amqp.exceptions import TaskAccessUnauthorized, TaskAlreadyAcquired
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.state.manager import (
    CANCELED,
    CLAIMED,
    DONE,
    LOCKED,
    Claim,
    StateManager,
    Watch,
    initial_state,
)
from guillotina_amqp.state.memory_operations import MemoryOperations
from guillotina_amqp.state.status import DONE_STATUSES, TaskStatus


class _Expiring(dict):
    """key -> (value, deadline or None); reads skip and drop expired entries."""

    def live(self, key: str) -> Any:
        entry = self.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if deadline is not None and deadline <= time.monotonic():
            del self[key]
            return None
        return value

    def put(self, key: str, value: Any, ttl: float | None) -> None:
        self[key] = (value, time.monotonic() + ttl if ttl else None)

    def merge(self, key: str, fields: dict[str, Any], ttl: float | None) -> dict[str, Any]:
        """Merge `fields` into the dict at `key`; `ttl` None keeps the current expiry, as Redis HSET does."""
        current = self.live(key)
        merged = {**(current or {}), **fields}
        if ttl is None and current is not None:
            self[key] = (merged, self[key][1])
        else:
            self.put(key, merged, ttl)
        return merged

    def expire(self, key: str, ttl: float | None) -> None:
        if self.live(key) is not None:
            self.put(key, self[key][0], ttl)


@configure.utility(provides=IStateManagerUtility, name="memory")
class MemoryStateManager(MemoryOperations, StateManager):
    def __init__(self) -> None:
        super().__init__()
        self._states = _Expiring()
        self._locks = _Expiring()
        self._canceled: dict[str, float] = {}
        self._watches: dict[str, set[Watch]] = {}

    def _changed(self, task_id: str) -> None:
        for watch in self._watches.get(task_id, ()):
            watch.event.set()

    def _merge(self, task_id: str, data: dict[str, Any], ttl: float | None) -> dict[str, Any]:
        # values are stored JSON-encoded, as in Redis: the same types come back, unserializable
        # values fail the same way, and callers never share mutable values with the store
        fields = {key: orjson.dumps(value) for key, value in data.items()}
        if not fields and self._states.live(task_id) is None:
            return {}  # Redis has no empty hashes: a state without fields does not exist
        state = _decoded(self._states.merge(task_id, fields, ttl))
        if "status" in data:
            self._changed(task_id)
        if "eventlog" in data and "status" not in data:
            self.notify(task_id)  # progress, live on the dashboard
        return state

    # -- hot path ---------------------------------------------------------
    async def create(self, task_id: str, data: dict[str, Any]) -> bool:
        if self._states.live(task_id) is not None:
            return False
        self._merge(task_id, data, self.state_ttl)
        await self.index(task_id)
        return True

    async def claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None = None) -> Claim:
        return await self._indexed(self._claim(task_id, job_data, lock_ttl, owner), task_id)

    async def _claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None) -> Claim:
        await self.create(task_id, initial_state())
        if (await self.get(task_id)).get("status") in DONE_STATUSES:
            # a late cancel of a task that already ended changes nothing (and is forgotten)
            self._canceled.pop(task_id, None)
            return Claim(DONE)
        if self._locks.live(task_id) is not None:
            # the cancel is left for the worker running the task (its status loop acts on it)
            return Claim(LOCKED)
        if self._canceled.pop(task_id, None) is not None:
            self._merge(task_id, {"status": TaskStatus.CANCELED}, self.state_ttl)
            return Claim(CANCELED)
        self._locks.put(task_id, owner or self.worker_id, lock_ttl)
        running = {"status": TaskStatus.RUNNING, "job_data": job_data, "updated": time.time()}
        state = self._merge(task_id, running, self.state_ttl)
        return Claim(CLAIMED, state.get("job_retries") or 0, state.get("eventlog") or [])

    async def finish(
        self, task_id: str, data: dict[str, Any], ttl: int | None, owner: str | None = None
    ) -> None:
        if self._locks.live(task_id) == (owner or self.worker_id):
            del self._locks[task_id]
        self._merge(task_id, data, ttl or None)  # no ttl keeps the current expiry, as in Redis
        await self.index(task_id)

    async def canceled_among(self, task_ids: Iterable[str]) -> set[str]:
        return {task_id for task_id in task_ids if task_id in self._canceled}

    async def refresh_locks(self, task_ids: Iterable[str], ttl: int, owner: str | None = None) -> None:
        for task_id in task_ids:
            if self._locks.live(task_id) == (owner or self.worker_id):
                self._locks.expire(task_id, ttl)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        watch = Watch()
        self._watches.setdefault(task_id, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watches[task_id]
            watchers.discard(watch)
            if not watchers:
                del self._watches[task_id]

    # -- SPEC §5 ------------------------------------------------------------
    async def update(self, task_id: str, data: dict[str, Any], ttl: int | None = None) -> None:
        self._merge(task_id, data, ttl if ttl is not None else self.state_ttl)
        await self.index(task_id)

    async def get(self, task_id: str) -> dict[str, Any]:
        return _decoded(self._states.live(task_id) or {})

    async def exists(self, task_id: str) -> bool:
        return self._states.live(task_id) is not None

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        for task_id in list(self._states):
            if task_id.startswith(prefix) and self._states.live(task_id) is not None:
                yield task_id

    async def acquire(self, task_id: str, ttl: int) -> bool:
        if self._locks.live(task_id) is not None:
            raise TaskAlreadyAcquired(task_id)
        self._locks.put(task_id, self.worker_id, ttl)
        return True

    async def is_locked(self, task_id: str) -> bool:
        return self._locks.live(task_id) is not None

    async def is_mine(self, task_id: str) -> bool:
        return self._locks.live(task_id) == self.worker_id

    def _check_owner(self, task_id: str) -> bool:
        owner = self._locks.live(task_id)
        if owner is None:
            return False
        if owner != self.worker_id:
            raise TaskAccessUnauthorized(task_id)
        return True

    async def release(self, task_id: str) -> bool:
        if self._check_owner(task_id):
            del self._locks[task_id]
            return True
        return False

    async def refresh_lock(self, task_id: str, ttl: int) -> bool:
        if self._check_owner(task_id):
            self._locks.expire(task_id, ttl)
            return True
        return False

    async def cancel(self, task_id: str) -> bool:
        self._canceled[task_id] = time.time()
        return True

    async def cancelation_list(self) -> AsyncIterator[str]:
        for task_id in list(self._canceled):
            yield task_id

    async def clean_canceled(self, task_id: str) -> bool:
        return self._canceled.pop(task_id, None) is not None

    async def is_canceled(self, task_id: str) -> bool:
        return task_id in self._canceled


def _decoded(fields: dict[str, bytes]) -> dict[str, Any]:
    return {key: orjson.loads(value) for key, value in fields.items()}
