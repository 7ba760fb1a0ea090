"""What operations (docs/design.md) ask of a state manager: a per-container task index, worker presence.

The index is one sorted set per container of every task id scored by creation time,
and one per status scored by when the task reached it, so that a page of a
container's tasks costs what it returns however many other states the store holds.
Entries are trimmed as their states expire; an entry whose state is gone is dropped
when a page meets it.
"""

import abc
import contextlib
from typing import Any, AsyncIterator, Iterable

#: index position: (score, task id) of the last entry of a page, the next page starts after it
Position = tuple[float, str]


class Operations(abc.ABC):
    """Index and presence methods every state manager provides, with the same semantics."""

    @abc.abstractmethod
    async def index(self, task_id: str) -> None:
        """Index the status a container's task holds now, unless it is indexed already, and tell
        the container's listeners. Ids made outside a container are not indexed.

        Idempotent and self-contained, so it may run right after any transition (the Redis
        manager runs it inside the transition's own script)."""

    @abc.abstractmethod
    async def index_page(
        self, container: str, status: str | None, after: Position | None, count: int
    ) -> list[Position]:
        """Up to `count` (score, id) of the container's index (`status` None: all), newest first,
        strictly after `after`."""

    @abc.abstractmethod
    async def index_counts(self, container: str, status: str, edges: list[float]) -> list[int]:
        """How many of the container's tasks reached `status` between consecutive `edges`."""

    @abc.abstractmethod
    async def index_entries(self, task_ids: list[str]) -> list[tuple[dict[str, Any], dict[str, float]]]:
        """(state, times) of each task, in one round trip; times: created/started/ended."""

    @abc.abstractmethod
    async def unindex(self, container: str, task_ids: Iterable[str]) -> None:
        """Drop entries whose state is gone."""

    @abc.abstractmethod
    def changes(self, container: str) -> contextlib.AbstractAsyncContextManager[AsyncIterator[str]]:
        """Context yielding an iterator of the ids of the container's tasks as their states change."""

    @abc.abstractmethod
    async def announce(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        """Publish a live worker's `info` for `ttl` seconds."""

    @abc.abstractmethod
    async def retire(self, worker_id: str) -> None:
        """Forget a worker that stopped."""

    @abc.abstractmethod
    async def workers(self) -> list[dict[str, Any]]:
        """What the live workers announced (those whose announcement expired are gone)."""


def after_position(position: Position, after: Position | None) -> bool:
    """Whether `position` comes after `after` in newest-first order (ties by id, descending)."""
    return after is None or position < after
