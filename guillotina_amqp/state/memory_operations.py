"""The container index and worker presence kept in process memory, as Redis keeps them."""

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable

from guillotina_amqp import names
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.memory_space import MemorySpace
from guillotina_amqp.state.operations import Operations, Position, after_position


class MemoryOperations(Operations):
    """Mixed into MemoryStateManager; entries expire like the Redis ones."""

    if TYPE_CHECKING:  # provided by MemoryStateManager

        @property
        def state_ttl(self) -> int: ...

    @property
    def _space(self) -> MemorySpace:
        """This process's state under the current prefix, shared by every manager of the process
        (as every client of one Redis server shares its keys)."""
        return MemorySpace.of(get_settings().redis_prefix_key)

    get: Callable[[str], Awaitable[dict[str, Any]]]

    def notify(self, task_id: str) -> None:
        """Tell the listeners of the task's container that its state changed."""
        container = names.container_of(task_id)
        for queue in self._space.listeners.get(container or "", ()):
            queue.put_nowait(task_id)

    async def index(self, task_id: str) -> None:
        container = names.container_of(task_id)
        if container is None:
            return
        status = (await self.get(task_id)).get("status")
        if status not in names.INDEXED_STATUSES:
            return
        if task_id in self._space.index.get((container, status), {}):
            return
        now = time.time()
        self._space.index.setdefault((container, None), {}).setdefault(task_id, now)
        for other in names.INDEXED_STATUSES:
            self._space.index.get((container, other), {}).pop(task_id, None)
        self._space.index.setdefault((container, status), {})[task_id] = now
        times = self._space.times.setdefault(task_id, {})
        times.setdefault("created", now)
        if status == "scheduled":
            times.pop("started", None)
            times.pop("ended", None)
        elif status == "running":
            times["started"] = now
            times.pop("ended", None)
        else:
            times["ended"] = now
        self._trim(container, now)
        self.notify(task_id)

    def _trim(self, container: str, now: float) -> None:
        cutoffs: dict[str | None, float] = {None: now - 2 * self.state_ttl}
        cutoffs.update({status: now - self.state_ttl for status in names.DONE_INDEXED})
        for status, cutoff in cutoffs.items():
            entries = self._space.index.get((container, status), {})
            for task_id in [task_id for task_id, score in entries.items() if score <= cutoff]:
                del entries[task_id]
                if status is None:
                    self._space.times.pop(task_id, None)

    async def index_page(
        self, container: str, status: str | None, after: Position | None, count: int
    ) -> list[Position]:
        entries = self._space.index.get((container, status), {})
        ordered = sorted(((score, task_id) for task_id, score in entries.items()), reverse=True)
        return [position for position in ordered if after_position(position, after)][:count]

    async def index_counts(self, container: str, status: str, edges: list[float]) -> list[int]:
        scores = list(self._space.index.get((container, status), {}).values())
        return [sum(low <= score < high for score in scores) for low, high in zip(edges, edges[1:])]

    async def index_entries(self, task_ids: list[str]) -> list[tuple[dict[str, Any], dict[str, float]]]:
        return [(await self.get(task_id), dict(self._space.times.get(task_id, {}))) for task_id in task_ids]

    async def unindex(self, container: str, task_ids: Iterable[str]) -> None:
        for task_id in list(task_ids):
            for status in (None, *names.INDEXED_STATUSES):
                self._space.index.get((container, status), {}).pop(task_id, None)
            self._space.times.pop(task_id, None)

    @contextlib.asynccontextmanager
    async def changes(self, container: str) -> AsyncIterator[AsyncIterator[str]]:
        queue: asyncio.Queue = asyncio.Queue()
        self._space.listeners.setdefault(container, set()).add(queue)

        async def changed() -> AsyncIterator[str]:
            while True:
                yield await queue.get()

        try:
            yield changed()
        finally:
            self._space.listeners[container].discard(queue)

    async def announce(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        self._space.workers[worker_id] = (dict(info), time.monotonic() + ttl)

    async def retire(self, worker_id: str) -> None:
        self._space.workers.pop(worker_id, None)

    async def workers(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for worker_id in [w for w, (_, deadline) in self._space.workers.items() if deadline <= now]:
            del self._space.workers[worker_id]
        return [dict(info) for info, _ in self._space.workers.values()]
