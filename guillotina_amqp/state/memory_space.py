"""The memory state manager's storage: one space per key prefix, for the whole process."""

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guillotina_amqp.state.manager import Watch


class Expiring(dict):
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

    def persist(self, key: str) -> None:
        self.expire(key, None)


class MemorySpace:
    """What Redis would hold under one prefix: states, locks, cancellations, periods, index,
    presence, and the watchers and listeners woken by changes."""

    #: prefix -> space, for the life of the process (as a server keeps its keys)
    _spaces: "dict[str, MemorySpace]" = {}

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.states = Expiring()
        self.locks = Expiring()
        self.canceled: dict[str, float] = {}
        self.watches: dict[str, set[Watch]] = {}
        self.periods = Expiring()
        # key -> {task id: score}; key is (container, status or None)
        self.index: dict[tuple[str, str | None], dict[str, float]] = {}
        self.times: dict[str, dict[str, float]] = {}
        self.listeners: dict[str, set[asyncio.Queue]] = {}
        self.workers: dict[str, tuple[dict[str, Any], float]] = {}

    @classmethod
    def of(cls, prefix: str) -> "MemorySpace":
        space = cls._spaces.get(prefix)
        if space is None:
            space = cls._spaces[prefix] = cls(prefix)
        return space

    def clear(self) -> None:
        stores = (self.states, self.locks, self.canceled, self.periods, self.index, self.times, self.workers)
        for store in stores:
            store.clear()
