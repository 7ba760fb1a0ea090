"""The container index and worker presence kept in Redis (docs/design.md#keys), one script per write.

Keys (all under `<prefix>meta:`, see guillotina_amqp.names): `meta:index:all:<container>`
and `meta:index:<status>:<container>` sorted sets, `meta:times:<task_id>` hashes (when the task
was created, started, ended, and which status is indexed),
`meta:workers:<worker_id>` announcements with a TTL and the `meta:workers` sorted set
naming them (so listing workers never scans the database).
"""

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import orjson
from redis.asyncio import Redis

from guillotina_amqp import names
from guillotina_amqp.state.operations import Operations, Position, after_position

T = TypeVar("T")

# index_state(state, base, task id, now, state ttl, channel): KEYS[state] is the task's state,
# KEYS[base + 1 .. base + 7] are the container's `all` set, the five status sets
# (names.INDEXED_STATUSES order) and the task's times hash.
# Indexes the status the state holds now, so it can run at the end of any transition (inside its
# script: the index changes with the state, atomically); a status already indexed (the times hash
# remembers which) changes nothing. An entry of `all` keeps its creation time; status sets hold
# the time of the transition.
INDEX_FUNCTION = """
local function index_state(state, base, task_id, now, ttl, channel)
  if redis.call('TYPE', KEYS[state])['ok'] ~= 'hash' then return 0 end  -- gone, or the original's JSON
  local raw = redis.call('HGET', KEYS[state], 'status')
  if not raw then return 0 end
  local status = cjson.decode(raw)
  local slots = {scheduled = 2, running = 3, finished = 4, errored = 5, canceled = 6}
  local slot = slots[status]
  local times = KEYS[base + 7]
  local previous = redis.call('HGET', times, 'status')
  if not slot or previous == status then return 0 end
  now, ttl = tonumber(now), tonumber(ttl)
  if previous and slots[previous] then redis.call('ZREM', KEYS[base + slots[previous]], task_id) end
  redis.call('ZADD', KEYS[base + slot], now, task_id)
  redis.call('EXPIRE', KEYS[base + slot], 2 * ttl)
  if redis.call('ZADD', KEYS[base + 1], 'NX', now, task_id) == 1 then
    -- a state lives state_ttl after its last transition: older entries have no state left
    redis.call('ZREMRANGEBYSCORE', KEYS[base + 1], '-inf', now - 2 * ttl)
    redis.call('EXPIRE', KEYS[base + 1], 2 * ttl)
  end
  if slot >= 4 then redis.call('ZREMRANGEBYSCORE', KEYS[base + slot], '-inf', now - ttl) end
  redis.call('HSET', times, 'status', status)
  redis.call('HSETNX', times, 'created', now)
  if status == 'scheduled' then
    redis.call('HDEL', times, 'started', 'ended')
  elseif status == 'running' then
    redis.call('HSET', times, 'started', now)
    redis.call('HDEL', times, 'ended')
  else
    redis.call('HSET', times, 'ended', now)
  end
  redis.call('EXPIRE', times, 2 * ttl)
  redis.call('PUBLISH', channel, status)
  return 1
end
"""

#: index arguments a transition script takes after its own: task id, now, state ttl, channel
INDEX_ARGS = 4

# KEYS: all, the five status sets, times, state. ARGV: task id, now, state ttl, channel.
INDEX = INDEX_FUNCTION + "return index_state(8, 0, unpack(ARGV))"


def indexing(script: str, own_keys: int) -> str:
    """`script` (a transition taking `own_keys` keys, the state first) that also indexes the state
    it leaves when called with the index keys and INDEX_ARGS arguments after its own. Its own
    trailing arguments end at LAST, not at #ARGV."""
    return (
        INDEX_FUNCTION
        + f"local LAST = #ARGV\nif #KEYS > {own_keys} then LAST = #ARGV - {INDEX_ARGS} end\n"
        + "local function transition()\n"
        + script
        + "\nend\nlocal result = transition()\n"
        + f"if #KEYS > {own_keys} then index_state(1, {own_keys}, unpack(ARGV, LAST + 1)) end\n"
        + "return result\n"
    )


# KEYS: a sorted set. ARGV: max score ('+inf' or a number), id at that score ('' = none), count.
# Entries strictly after (score, id) in newest-first order; ties are ordered by id, descending.
PAGE = """
local count, out, offset = tonumber(ARGV[3]), {}, 0
while #out < 2 * count do
  local batch = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'WITHSCORES', 'LIMIT', offset, count)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local later = ARGV[2] == '' or tonumber(batch[i + 1]) < tonumber(ARGV[1]) or batch[i] < ARGV[2]
    if #out < 2 * count and later then
      out[#out + 1] = batch[i]
      out[#out + 1] = batch[i + 1]
    end
  end
  offset = offset + count
end
return out
"""

SCRIPTS = {"index": INDEX, "index_page": PAGE}


class RedisOperations(Operations):
    """Mixed into RedisStateManager: uses its prefix, script runner and retrying calls."""

    if TYPE_CHECKING:  # provided by RedisStateManager

        @property
        def prefix(self) -> str: ...

        @property
        def state_ttl(self) -> int: ...

    _run: Callable[[str, list[str], list[Any]], Awaitable[Any]]
    _call: Callable[[Callable[[Redis], Awaitable[Any]]], Awaitable[Any]]

    client: Callable[[], Awaitable[Redis]]
    get: Callable[[str], Awaitable[dict[str, Any]]]

    async def index(self, task_id: str) -> None:
        keys, args = self._index_parts(task_id)
        if keys:
            await self._run("index", [*keys, names.state_key(self.prefix, task_id)], args)

    def _index_parts(self, task_id: str) -> tuple[list[str], list[Any]]:
        """The keys and arguments indexing `task_id` takes (see INDEX_FUNCTION); none outside a
        container."""
        container = names.container_of(task_id)
        if container is None:
            return [], []
        prefix = self.prefix
        keys = [names.index_key(prefix, container)]
        keys += [names.index_key(prefix, container, s) for s in names.INDEXED_STATUSES]
        keys.append(names.times_key(prefix, task_id))
        return keys, [task_id, time.time(), self.state_ttl, names.done_channel(prefix, task_id)]

    async def index_page(
        self, container: str, status: str | None, after: Position | None, count: int
    ) -> list[Position]:
        key = names.index_key(self.prefix, container, status)
        bound = ["+inf", ""] if after is None else [repr(after[0]), after[1]]
        flat = await self._run("index_page", [key], [*bound, count])
        found = [(float(flat[i + 1]), flat[i].decode()) for i in range(0, len(flat), 2)]
        return [position for position in found if after_position(position, after)]

    async def index_counts(self, container: str, status: str, edges: list[float]) -> list[int]:
        key = names.index_key(self.prefix, container, status)

        async def send(client: Redis) -> list[int]:
            async with client.pipeline(transaction=False) as pipe:
                for low, high in zip(edges, edges[1:]):
                    pipe.zcount(key, low, f"({high}")
                return await pipe.execute()

        return await self._call(send)

    async def index_entries(self, task_ids: list[str]) -> list[tuple[dict[str, Any], dict[str, float]]]:
        prefix = self.prefix

        async def send(client: Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hgetall(names.times_key(prefix, task_id))
                return await pipe.execute()

        # states through get(): the original's JSON states and the event log lists read too
        states = await asyncio.gather(*(self.get(task_id) for task_id in task_ids))
        times = await self._call(send) if task_ids else []
        return [
            (state, {key.decode(): float(value) for key, value in found.items() if key != b"status"})
            for state, found in zip(states, times)
        ]

    async def unindex(self, container: str, task_ids: Iterable[str]) -> None:
        ids = list(task_ids)
        if not ids:
            return
        keys = [names.index_key(self.prefix, container)]
        keys += [names.index_key(self.prefix, container, s) for s in names.INDEXED_STATUSES]

        async def send(client: Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zrem(key, *ids)
                await pipe.execute()

        await self._call(send)

    @contextlib.asynccontextmanager
    async def changes(self, container: str) -> AsyncIterator[AsyncIterator[str]]:
        client = await self.client()
        start = len(names.done_channel(self.prefix, ""))
        async with client.pubsub() as pubsub:
            await pubsub.psubscribe(names.changed_pattern(self.prefix, container))
            # subscribed once Redis says so: changes from then on are heard
            await pubsub.get_message(timeout=5)

            async def changed() -> AsyncIterator[str]:
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        yield message["channel"].decode()[start:]

            yield changed()

    async def announce(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        key, registry = names.worker_key(self.prefix, worker_id), names.workers_key(self.prefix)
        now, body = time.time(), orjson.dumps(info)

        async def send(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(key, body, px=int(ttl * 1000))
                pipe.zadd(registry, {worker_id: now + ttl})
                pipe.zremrangebyscore(registry, "-inf", now)
                await pipe.execute()

        await self._call(send)

    async def retire(self, worker_id: str) -> None:
        key, registry = names.worker_key(self.prefix, worker_id), names.workers_key(self.prefix)

        async def send(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.zrem(registry, worker_id)
                await pipe.execute()

        await self._call(send)

    async def workers(self) -> list[dict[str, Any]]:
        registry = names.workers_key(self.prefix)
        ids = [i.decode() for i in await self._call(lambda client: client.zrange(registry, 0, -1))]
        if not ids:
            return []
        keys = [names.worker_key(self.prefix, worker_id) for worker_id in ids]
        found = await self._call(lambda client: client.mget(keys))
        return [orjson.loads(body) for body in found if body is not None]
