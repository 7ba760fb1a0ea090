"""State kept in Redis, shared by every API process and worker.

Layout: the state of a task is a hash at `<prefix><task_id>` whose fields hold
JSON values (so one field can change atomically without re-encoding the
rest), expiring after `state_ttl`; `<prefix>lock:<task_id>` holds the owner
worker id with a TTL; the sorted set `<prefix>cancel` holds canceled ids
scored by time. Every state transition is one round trip (a Lua script or a
pipeline) and publishes on `<prefix>changed:<task_id>` so `join()` need not poll.
"""

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import backoff
import orjson
from guillotina import configure
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guillotina_amqp import names
from guillotina_amqp.exceptions import StateManagerUnavailable, TaskAccessUnauthorized, TaskAlreadyAcquired
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.manager import CLAIMED, Claim, StateManager, Watch, initial_state
from guillotina_amqp.state.redis_operations import SCRIPTS as OPERATIONS_SCRIPTS
from guillotina_amqp.state.redis_operations import RedisOperations
from guillotina_amqp.state.status import TaskStatus

logger = logging.getLogger("guillotina_amqp")
T = TypeVar("T")
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: state, lock, cancel set. ARGV: task id, owner, lock ttl, state ttl,
# channel, n, n field/value pairs of the initial state, then the running fields.
CLAIM = """
local n = tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 7, 6 + 2 * n))
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
local status = redis.call('HGET', KEYS[1], 'status')
if status == '"finished"' or status == '"canceled"' then
  -- a late cancel of a task that already ended changes nothing (and is forgotten)
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'done'}
end
-- locked: the cancel is left for the worker running the task (its status loop acts on it)
if redis.call('EXISTS', KEYS[2]) == 1 then return {'locked'} end
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status', '"canceled"')
  redis.call('PUBLISH', ARGV[5], 'canceled')
  return {'canceled'}
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[3]) then return {'locked'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 7 + 2 * n))
redis.call('PUBLISH', ARGV[5], 'running')
local found = redis.call('HMGET', KEYS[1], 'job_retries', 'eventlog')
return {'claimed', found[1] or '0', found[2] or '[]'}
"""

# KEYS: state, lock. ARGV: owner, ttl (0 = none), channel, field/value pairs.
FINISH = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[3], 'changed')
return 1
"""

# KEYS: lock. ARGV: owner, ttl (0 = release). 0 = not held, 1 = done, -1 = not ours.
OWNED_LOCK = """
local owner = redis.call('GET', KEYS[1])
if not owner then return 0 end
if owner ~= ARGV[1] then return -1 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: locks. ARGV: owner, ttl.
REFRESH_LOCKS = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('EXPIRE', key, ARGV[2]) end
end
return 1
"""


def _fields(data: dict[str, Any]) -> list[Any]:
    flat: list[Any] = []
    for key, value in data.items():
        flat += [key, orjson.dumps(value)]
    return flat


def _decode(raw: dict[Any, Any]) -> dict[str, Any]:
    return {_text(key): orjson.loads(value) for key, value in raw.items()}


def _text(value: Any) -> str:
    """A reply as text (the client is not configured to decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@backoff.on_exception(backoff.expo, TRANSIENT, max_time=30, max_value=4, logger=logger)
async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()`, retrying transient connection errors with exponential backoff (about 30 s in all).

    Takes a factory, not an awaitable: each attempt must send its commands anew
    (redis-py's command methods are not coroutine functions, so backoff cannot
    wrap them, and a pipeline forgets its queued commands after a failed execute).
    """
    return await call()


async def _first_then_retrying(call: Callable[[], Awaitable[T]]) -> T:
    """`call()` once directly (the hot path skips backoff's bookkeeping), then with backoff."""
    try:
        return await call()
    except TRANSIENT:
        return await _retrying(call)


class _ScriptBatch:
    """Sends the script calls made during one event-loop iteration as one pipeline.

    Twenty running tasks, or a hundred concurrent add_task callers, then share
    one write, one read and one connection instead of paying redis-py's
    per-command overhead each. Every script stays atomic on its own; a
    pipeline only saves round trips (no MULTI: one failing call fails alone).
    """

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.pending: list[tuple[Any, list, list, asyncio.Future]] = []

    def run(self, script: Any, keys: list, args: list) -> asyncio.Future:
        future = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self._flush)
        self.pending.append((script, keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if len(batch) == 1:
            script, keys, args, future = batch[0]
            _chain(asyncio.ensure_future(script(keys=keys, args=args)), future)
        else:
            asyncio.ensure_future(self._send(batch))

    async def _send(self, batch: list[tuple[Any, list, list, asyncio.Future]]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (script, keys, args, future), result in zip(batch, results):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, NoScriptError):
                # scripts flushed (or a new server): the script object loads itself again
                _chain(asyncio.ensure_future(script(keys=keys, args=args)), future)
            elif isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _chain(source: asyncio.Future, target: asyncio.Future) -> None:
    def copy(done: asyncio.Future) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


class _Notifier:
    """One pattern subscription per process that wakes the local `watch()`ers."""

    def __init__(self, client: Redis, pattern: str) -> None:
        self.client = client
        self.pattern = pattern
        self.watches: dict[str, set["Watch"]] = {}
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.psubscribe(self.pattern)
                    self.ready.set()
                    await self._dispatch(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception:
                # wake everyone so they re-read the state, then resubscribe
                self.ready.clear()
                self._wake_all()
                logger.warning("Task state listener lost its Redis connection; resubscribing")
                await asyncio.sleep(0.5)

    async def _dispatch(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                for watch in self.watches.get(message["channel"].decode(), ()):
                    watch.event.set()

    def _wake_all(self) -> None:
        for watches in self.watches.values():
            for watch in watches:
                watch.event.set()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


@configure.utility(provides=IStateManagerUtility, name="redis")
class RedisStateManager(RedisOperations, StateManager):
    def __init__(self) -> None:
        super().__init__()
        self._client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._notifier: _Notifier | None = None
        self._batch: _ScriptBatch | None = None

    @property
    def prefix(self) -> str:
        return get_settings().redis_prefix_key

    async def client(self) -> Redis:
        if self._client is None:
            from guillotina.contrib import redis as contrib_redis

            if contrib_redis._driver is None:
                raise StateManagerUnavailable(
                    "amqp.persistent_manager='redis' needs 'guillotina.contrib.redis' in applications "
                    "(and its 'redis' settings block)"
                )
            driver = await contrib_redis.get_driver()
            self._client = driver.pool
            for name, source in (
                ("create", CREATE),
                ("claim", CLAIM),
                ("finish", FINISH),
                ("owned_lock", OWNED_LOCK),
                ("refresh_locks", REFRESH_LOCKS),
                *OPERATIONS_SCRIPTS.items(),
            ):
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._client if self._client is not None else await self.client()
        batch = self._batch
        if batch is None or batch.client is not client or batch.loop is not asyncio.get_running_loop():
            batch = self._batch = _ScriptBatch(client)
        return await _first_then_retrying(lambda: batch.run(self._scripts[script], keys, args))

    async def _call(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """`command(client)`, retried on transient errors."""
        client = self._client if self._client is not None else await self.client()
        return await _first_then_retrying(lambda: command(client))

    def _keys(self, task_id: str, prefix: str | None = None) -> tuple[str, str, str]:
        prefix = self.prefix if prefix is None else prefix
        return names.state_key(prefix, task_id), names.lock_key(prefix, task_id), names.cancel_key(prefix)

    # -- hot path ---------------------------------------------------------
    async def create(self, task_id: str, data: dict[str, Any]) -> bool:
        config = get_settings()  # once per call: it is rebuilt from app_settings each time
        key = names.state_key(config.redis_prefix_key, task_id)
        create = self._run("create", [key], [config.state_ttl, *_fields(data)])
        return bool(await self._indexed(create, task_id))

    async def claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None = None) -> Claim:
        config = get_settings()
        prefix = config.redis_prefix_key
        initial = _fields(initial_state())
        running = _fields({"status": TaskStatus.RUNNING, "job_data": job_data, "updated": time.time()})
        args = [task_id, owner or self.worker_id, lock_ttl, config.state_ttl]
        args += [names.done_channel(prefix, task_id), len(initial) // 2, *initial, *running]
        found = await self._indexed(self._run("claim", list(self._keys(task_id, prefix)), args), task_id)
        outcome = found[0].decode()
        if outcome != CLAIMED:
            return Claim(outcome)
        return Claim(outcome, orjson.loads(found[1]) or 0, orjson.loads(found[2]) or [])

    async def finish(
        self, task_id: str, data: dict[str, Any], ttl: int | None, owner: str | None = None
    ) -> None:
        prefix = self.prefix
        key, lock, _ = self._keys(task_id, prefix)
        args = [owner or self.worker_id, ttl or 0, names.done_channel(prefix, task_id), *_fields(data)]
        await self._indexed(self._run("finish", [key, lock], args), task_id)

    async def canceled_among(self, task_ids: Iterable[str]) -> set[str]:
        ids = list(task_ids)
        if not ids:
            return set()
        scores = await self._call(lambda client: client.zmscore(names.cancel_key(self.prefix), ids))
        return {task_id for task_id, score in zip(ids, scores) if score is not None}

    async def refresh_locks(self, task_ids: Iterable[str], ttl: int, owner: str | None = None) -> None:
        locks = [names.lock_key(self.prefix, task_id) for task_id in task_ids]
        if locks:
            await self._run("refresh_locks", locks, [owner or self.worker_id, ttl])

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        notifier = await self._get_notifier()
        channel = names.done_channel(self.prefix, task_id)
        watch = Watch()
        notifier.watches.setdefault(channel, set()).add(watch)
        try:
            yield watch
        finally:
            watches = notifier.watches.get(channel, set())
            watches.discard(watch)
            if not watches:
                notifier.watches.pop(channel, None)

    async def _get_notifier(self) -> _Notifier:
        if self._notifier is None or self._notifier.task.done():
            client = await self.client()
            self._notifier = _Notifier(client, names.done_channel(self.prefix, "*"))
        with contextlib.suppress(asyncio.TimeoutError):
            # without the subscription a watcher still wakes on its own timeout
            await asyncio.wait_for(self._notifier.ready.wait(), 5)
        return self._notifier

    async def finalize(self) -> None:
        if self._notifier is not None:
            await self._notifier.close()
            self._notifier = None

    # -- SPEC §5 ------------------------------------------------------------
    async def update(self, task_id: str, data: dict[str, Any], ttl: int | None = None) -> None:
        key = names.state_key(self.prefix, task_id)
        mapping = dict(zip(*[iter(_fields(data))] * 2))
        ttl = ttl if ttl is not None else self.state_ttl

        async def send(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                if mapping:
                    pipe.hset(key, mapping=mapping)
                pipe.expire(key, ttl)
                if "status" in data or "eventlog" in data:  # progress too, live on the dashboard
                    pipe.publish(names.done_channel(self.prefix, task_id), "changed")
                await pipe.execute()

        await self._call(send)
        if "status" in data:
            await self.index(task_id)

    async def get(self, task_id: str) -> dict[str, Any]:
        key = names.state_key(self.prefix, task_id)
        return _decode(await self._call(lambda client: client.hgetall(key)))

    async def exists(self, task_id: str) -> bool:
        key = names.state_key(self.prefix, task_id)
        return bool(await self._call(lambda client: client.exists(key)))

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        client = await self.client()
        base = self.prefix
        pattern = _glob_escape(base + prefix) + "*"
        # bookkeeping keys are strings and a sorted set: TYPE hash keeps tasks only
        async for key in client.scan_iter(match=pattern, count=1000, _type="hash"):
            task_id = key.decode()[len(base) :]
            if not task_id.startswith(names.META):  # the operations' hashes (meta:times:...)
                yield task_id

    async def acquire(self, task_id: str, ttl: int) -> bool:
        lock, owner = names.lock_key(self.prefix, task_id), self.worker_id
        if not await self._call(lambda client: client.set(lock, owner, nx=True, ex=ttl)):
            raise TaskAlreadyAcquired(task_id)
        return True

    async def is_locked(self, task_id: str) -> bool:
        lock = names.lock_key(self.prefix, task_id)
        return bool(await self._call(lambda client: client.exists(lock)))

    async def is_mine(self, task_id: str) -> bool:
        lock = names.lock_key(self.prefix, task_id)
        owner = await self._call(lambda client: client.get(lock))
        return owner is not None and _text(owner) == self.worker_id

    async def _owned_lock(self, task_id: str, ttl: int) -> bool:
        done = await self._run("owned_lock", [names.lock_key(self.prefix, task_id)], [self.worker_id, ttl])
        if done == -1:
            raise TaskAccessUnauthorized(task_id)
        return done == 1

    async def release(self, task_id: str) -> bool:
        return await self._owned_lock(task_id, 0)

    async def refresh_lock(self, task_id: str, ttl: int) -> bool:
        return await self._owned_lock(task_id, ttl)

    async def cancel(self, task_id: str) -> bool:
        key, now, state_ttl = names.cancel_key(self.prefix), time.time(), self.state_ttl

        async def send(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zadd(key, {task_id: now})
                # forget cancellations older than any state they could refer to
                pipe.zremrangebyscore(key, "-inf", now - state_ttl)
                await pipe.execute()

        await self._call(send)
        return True

    async def cancelation_list(self) -> AsyncIterator[str]:
        key = names.cancel_key(self.prefix)
        for task_id in await self._call(lambda client: client.zrange(key, 0, -1)):
            yield _text(task_id)

    async def clean_canceled(self, task_id: str) -> bool:
        key = names.cancel_key(self.prefix)
        return bool(await self._call(lambda client: client.zrem(key, task_id)))

    async def is_canceled(self, task_id: str) -> bool:
        key = names.cancel_key(self.prefix)
        return await self._call(lambda client: client.zscore(key, task_id)) is not None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
