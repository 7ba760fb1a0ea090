"""State kept in process memory, with the same semantics (TTLs included) as Redis."""

import contextlib
import time
from typing import Any, AsyncIterator, Iterable

import orjson
from guillotina import configure

from guillotina_amqp import runs
from guillotina_amqp.exceptions import RunFromTheFuture, TaskAccessUnauthorized, TaskAlreadyAcquired
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.names import check_task_id
from guillotina_amqp.state.manager import (
    CANCELED,
    CLAIMED,
    DONE,
    LOCKED,
    STALE,
    Claim,
    StateManager,
    Watch,
    initial_state,
    is_valid_task_id,
)
from guillotina_amqp.state.memory_operations import MemoryOperations
from guillotina_amqp.state.status import DONE_STATUSES, TaskStatus


@configure.utility(provides=IStateManagerUtility, name="memory")
class MemoryStateManager(MemoryOperations, StateManager):
    async def _clean(self) -> None:
        self._space.clear()

    def _changed(self, task_id: str) -> None:
        for watch in self._space.watches.get(task_id, ()):
            watch.event.set()

    def _merge(self, task_id: str, data: dict[str, Any], ttl: float | None) -> dict[str, Any]:
        # values are stored JSON-encoded, as in Redis: the same types come back, unserializable
        # values fail the same way, and callers never share mutable values with the store
        fields = {key: _encoded(key, value) for key, value in data.items()}
        if not fields and self._space.states.live(task_id) is None:
            return {}  # Redis has no empty hashes: a state without fields does not exist
        state = _decoded(self._space.states.merge(task_id, fields, ttl))
        if "status" in data:
            self._changed(task_id)
        if "eventlog" in data and "status" not in data:
            self.notify(task_id)  # progress, live on the dashboard
        return state

    def _stored_run(self, task_id: str) -> str | None:
        """The run of the stored state ("" for a state without one); None without a state."""
        fields = self._space.states.live(task_id)
        if fields is None:
            return None
        return orjson.loads(fields["run"]) if "run" in fields else ""

    def _run_of(self, task_id: str) -> str | None:
        """The stored run as it orders runs: one from the future orders nothing ("")."""
        run = self._stored_run(task_id)
        return "" if run is not None and runs.from_the_future(run, time.time_ns()) else run

    # -- hot path ---------------------------------------------------------
    async def next_run(self, task_id: str) -> str:
        # this process is the store: its clock orders the runs, as Redis's does there
        return runs.next_run(time.time_ns(), self._run_of(task_id) or "")

    async def create(self, task_id: str, data: dict[str, Any]) -> bool:
        check_task_id(task_id)
        current = self._run_of(task_id)
        if current is not None:
            if current >= data.get("run", ""):
                return False
            del self._space.states[task_id]  # an earlier run of a reused id: this one starts anew
        self._merge(task_id, data, None)
        await self.index(task_id)
        return True

    async def claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None = None) -> Claim:
        claim = await self._claim(task_id, job_data, lock_ttl, owner)
        await self.index(task_id)
        return claim

    async def _claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None) -> Claim:
        run = job_data.get("run", "")
        if runs.from_the_future(run, time.time_ns()):
            raise RunFromTheFuture(task_id, run)
        current = self._run_of(task_id)
        if current is not None and current > run:
            return Claim(STALE)
        if current is not None and current < run:
            if self._space.locks.live(task_id) is not None:
                return Claim(LOCKED)
            del self._space.states[task_id]
        await self.create(task_id, initial_state(run))
        state = await self.get(task_id)
        if _ended(state):
            # a late cancel of a task that already ended changes nothing (and is forgotten)
            self._space.canceled.pop(task_id, None)
            return Claim(DONE, status=state.get("status"))
        if self._space.locks.live(task_id) is not None:
            # the cancel is left for the worker running the task (its status loop acts on it)
            return Claim(LOCKED)
        if self._space.canceled.pop(task_id, None) is not None:
            self._merge(task_id, {"status": TaskStatus.CANCELED}, self.state_ttl)
            return Claim(CANCELED)
        self._space.locks.put(task_id, owner or self.worker_id, lock_ttl)
        running = {"status": TaskStatus.RUNNING, "job_data": job_data, "updated": time.time()}
        # still running, yet nobody holds its lock: the worker that ran it died (or lost its lock)
        crashes = (state.get("crashes") or 0) + (state.get("status") == TaskStatus.RUNNING)
        if crashes:
            running["crashes"] = crashes
        state = self._merge(task_id, running, None)
        self._space.states.persist(task_id)  # a live state never expires
        return Claim(CLAIMED, state.get("job_retries") or 0, crashes=crashes)

    async def finish(
        self,
        task_id: str,
        data: dict[str, Any],
        ttl: int | None,
        owner: str | None = None,
        run: str | None = None,
        only_open: bool = False,
    ) -> bool:
        if self._space.locks.live(task_id) == (owner or self.worker_id):
            del self._space.locks[task_id]
        current = self._stored_run(task_id)
        if current is not None and (
            (run is not None and current != run) or (only_open and _ended(await self.get(task_id)))
        ):
            return False  # another run owns the state now: leave it alone
        self._merge(task_id, data, ttl or None)  # no ttl keeps the current expiry, as in Redis
        await self.index(task_id)
        return True

    async def append_event(self, task_id: str, entry: list, limit: int) -> None:
        fields = self._space.states.live(task_id)
        if fields is None:
            return
        events = fields.setdefault("eventlog", [])
        events.append(orjson.dumps(entry))
        del events[:-limit]
        self.notify(task_id)  # progress, live on the dashboard

    async def canceled_among(self, task_ids: Iterable[str]) -> set[str]:
        return {task_id for task_id in task_ids if task_id in self._space.canceled}

    async def refresh_locks(self, task_ids: Iterable[str], ttl: int, owner: str | None = None) -> None:
        for task_id in task_ids:
            if self._space.locks.live(task_id) == (owner or self.worker_id):
                self._space.locks.expire(task_id, ttl)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        watch = Watch()
        self._space.watches.setdefault(task_id, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._space.watches[task_id]
            watchers.discard(watch)
            if not watchers:
                del self._space.watches[task_id]

    async def claim_period(self, name: str, period: int, ttl: float, token: str) -> bool:
        key = f"{name}:{period}"
        if self._space.periods.live(key) is None:
            self._space.periods.put(key, token, ttl)
        return self._space.periods.live(key) == token

    async def release_period(self, name: str, period: int) -> None:
        self._space.periods.pop(f"{name}:{period}", None)

    # -- IStateManagerUtility, as the original plugin had it --------------
    async def update(self, task_id: str, data: dict[str, Any], ttl: int | None = None) -> None:
        check_task_id(task_id)
        if ttl is None and self._space.states.live(task_id) is None:
            ttl = self.state_ttl  # a state made by update() alone expires like an ended one
        self._merge(task_id, data, ttl)
        await self.index(task_id)

    async def get(self, task_id: str) -> dict[str, Any]:
        if not is_valid_task_id(task_id):
            return {}
        return _decoded(self._space.states.live(task_id) or {})

    async def exists(self, task_id: str) -> bool:
        return is_valid_task_id(task_id) and self._space.states.live(task_id) is not None

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        for task_id in list(self._space.states):
            if task_id.startswith(prefix) and self._space.states.live(task_id) is not None:
                yield task_id

    async def acquire(self, task_id: str, ttl: int) -> bool:
        if self._space.locks.live(task_id) is not None:
            raise TaskAlreadyAcquired(task_id)
        self._space.locks.put(task_id, self.worker_id, ttl)
        return True

    async def is_locked(self, task_id: str) -> bool:
        return self._space.locks.live(task_id) is not None

    async def is_mine(self, task_id: str) -> bool:
        return self._space.locks.live(task_id) == self.worker_id

    def _check_owner(self, task_id: str) -> bool:
        owner = self._space.locks.live(task_id)
        if owner is None:
            return False
        if owner != self.worker_id:
            raise TaskAccessUnauthorized(task_id)
        return True

    async def release(self, task_id: str) -> bool:
        if self._check_owner(task_id):
            del self._space.locks[task_id]
            return True
        return False

    async def refresh_lock(self, task_id: str, ttl: int) -> bool:
        if self._check_owner(task_id):
            self._space.locks.expire(task_id, ttl)
            return True
        return False

    async def cancel(self, task_id: str) -> bool:
        self._space.canceled[task_id] = time.time()
        return True

    async def cancelation_list(self) -> AsyncIterator[str]:
        for task_id in list(self._space.canceled):
            yield task_id

    async def clean_canceled(self, task_id: str) -> bool:
        return self._space.canceled.pop(task_id, None) is not None

    async def is_canceled(self, task_id: str) -> bool:
        return task_id in self._space.canceled


def _encoded(key: str, value: Any) -> Any:
    """A field as stored: JSON, and the event log as a list of JSON entries (appended in place)."""
    if key == "eventlog":
        return [orjson.dumps(entry) for entry in value]
    return orjson.dumps(value)


def _decoded(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        key: [orjson.loads(entry) for entry in value] if key == "eventlog" else orjson.loads(value)
        for key, value in fields.items()
    }


def _ended(state: dict[str, Any]) -> bool:
    return state.get("status") in DONE_STATUSES or state.get("ended") is not None
