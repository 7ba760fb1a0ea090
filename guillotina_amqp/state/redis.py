"""State kept in Redis, shared by every API process and worker.

Layout: the state of a task is a hash at `<prefix><task_id>` whose fields hold
JSON values (so one field can change atomically without re-encoding the
rest); its event log is a capped list at `<prefix>eventlog:<task_id>`; both
never expire while the task is live and expire `state_ttl` after it ended.
`<prefix>lock:<task_id>` holds the owner worker id with a TTL; the sorted set
`<prefix>cancel` holds canceled ids scored by time. Every state transition is
one round trip (a Lua script) and publishes on `<prefix>changed:<task_id>` so
`join()` need not poll. A JSON string at `<prefix><task_id>` is the original
plugin's layout: read as it is, and turned into ours by the first transition.
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

from guillotina_amqp import names, runs
from guillotina_amqp.cancelling import cancel_and_wait
from guillotina_amqp.exceptions import (
    RunFromTheFuture,
    TaskAccessUnauthorized,
    TaskAlreadyAcquired,
    TaskStateUnusable,
)
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.names import check_task_id
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import redis_client
from guillotina_amqp.state.manager import (
    CLAIMED,
    Claim,
    StateManager,
    Watch,
    initial_state,
    is_valid_task_id,
    legacy_state,
)
from guillotina_amqp.state.redis_operations import SCRIPTS as OPERATIONS_SCRIPTS
from guillotina_amqp.state.redis_operations import RedisOperations, indexing
from guillotina_amqp.state.redis_pipe import RedisPipe
from guillotina_amqp.state.status import TaskStatus

logger = logging.getLogger("guillotina_amqp")
T = TypeVar("T")
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

# Every script that touches a state first looks at its key's type: a string is the
# original plugin's JSON state (taken over by Python, then the script runs again),
# anything but a hash is refused before a single write.
KIND = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return {'legacy'} end
if kind ~= 'hash' and kind ~= 'none' then return {'wrongtype', kind} end
"""
# Runs (guillotina_amqp.runs): `run` (JSON text) grows with each add_task of the same id,
# ordered by Redis's own clock; compared as text. A run later than Redis's clock allows
# (plus a margin) was made by no one: a message carrying one is refused, a stored one
# orders nothing.
RUN = (
    """
local function horizon()
  local now = redis.call('TIME')
  return string.format('"%011d%06d000~', tonumber(now[1]) + """
    + str(runs.FUTURE_MARGIN_NS // 10**9)
    + """, tonumber(now[2]))
end
local function current_run()
  local run = redis.call('HGET', KEYS[1], 'run') or '""'
  if run > horizon() then return '""' end
  return run
end
local function ended()
  local status = redis.call('HGET', KEYS[1], 'status')
  local ended = redis.call('HGET', KEYS[1], 'ended')
  return status == '"finished"' or status == '"canceled"' or (ended and ended ~= 'null')
end
"""
)

# KEYS: state. -> {seconds, microseconds, the stored run as JSON}: what a new run follows
NEXT_RUN = """
local run = '""'
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then run = redis.call('HGET', KEYS[1], 'run') or '""' end
local now = redis.call('TIME')
return {now[1], now[2], run}
"""

# KEYS: state, eventlog. ARGV: channel, run, field/value pairs.
CREATE = (
    KIND
    + RUN
    + """
if kind == 'hash' then
  if current_run() >= ARGV[2] then return {'exists'} end
  redis.call('DEL', KEYS[1], KEYS[2])  -- an earlier run of a reused id: this one starts anew
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3, LAST))
redis.call('PUBLISH', ARGV[1], 'scheduled')
return {'created'}
"""
)

# KEYS: state, lock, cancel set, eventlog. ARGV: task id, owner, lock ttl, state ttl,
# channel, run, n, n field/value pairs of the initial state, then the running fields.
CLAIM = (
    KIND
    + RUN
    + """
local n = tonumber(ARGV[7])
if ARGV[6] > horizon() then return {'future'} end
if kind == 'hash' then
  local run = current_run()
  if run > ARGV[6] then return {'stale'} end
  if run < ARGV[6] then
    -- a later run not recorded yet by its add_task: never while the earlier one runs
    if redis.call('EXISTS', KEYS[2]) == 1 then return {'locked'} end
    redis.call('DEL', KEYS[1], KEYS[4])
    kind = 'none'
  end
end
if kind == 'none' then redis.call('HSET', KEYS[1], unpack(ARGV, 8, 7 + 2 * n)) end
if ended() then
  -- a late cancel of a task that already ended changes nothing (and is forgotten)
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'done', redis.call('HGET', KEYS[1], 'status')}
end
-- locked: the cancel is left for the worker running the task (its status loop acts on it)
if redis.call('EXISTS', KEYS[2]) == 1 then return {'locked'} end
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status', '"canceled"')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
  redis.call('PUBLISH', ARGV[5], 'canceled')
  return {'canceled'}
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[3]) then return {'locked'} end
-- still running, yet nobody holds its lock: the worker that ran it died (or lost its lock)
local crashes = redis.call('HGET', KEYS[1], 'crashes') or '0'
if redis.call('HGET', KEYS[1], 'status') == '"running"' then
  crashes = tostring(redis.call('HINCRBY', KEYS[1], 'crashes', 1))
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8 + 2 * n, LAST))
-- a live state never expires: it gets its state_ttl when the task ends
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[4])
redis.call('PUBLISH', ARGV[5], 'running')
return {'claimed', redis.call('HGET', KEYS[1], 'job_retries') or '0', crashes}
"""
)

# KEYS: state, lock, eventlog. ARGV: owner, ttl (0 = keep), channel, run ('' = any),
# 'open' to write only into a state that has not ended, field/value pairs.
FINISH = (
    KIND
    + RUN
    + """
local function release()
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
end
if kind == 'hash' then
  local stored = redis.call('HGET', KEYS[1], 'run') or '""'
  if (ARGV[4] ~= '' and stored ~= ARGV[4]) or (ARGV[5] == 'open' and ended()) then
    release()  -- another run owns the state now: leave it alone
    return {'stale'}
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6, LAST))
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
release()
redis.call('PUBLISH', ARGV[3], 'changed')
return {'written'}
"""
)

# KEYS: state, eventlog. ARGV: ttl (0 = keep; a new state gets ARGV[2]), state ttl, channel,
# 'publish', 'replace' (the event log follows), n, n field/value pairs, event log entries.
UPDATE = (
    KIND
    + """
local n = tonumber(ARGV[6])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 7, 6 + 2 * n)) end
if ARGV[5] == 'replace' then
  redis.call('DEL', KEYS[2])
  if LAST > 6 + 2 * n then redis.call('RPUSH', KEYS[2], unpack(ARGV, 7 + 2 * n, LAST)) end
end
local ttl = tonumber(ARGV[1])
if ttl == 0 and kind == 'none' then ttl = tonumber(ARGV[2]) end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if ARGV[4] == 'publish' then redis.call('PUBLISH', ARGV[3], 'changed') end
return {'written'}
"""
)

# KEYS: state, eventlog. ARGV: max entries, entry, channel. The list follows the state's expiry.
APPEND_EVENT = (
    KIND
    + """
if kind == 'none' then return {'missing'} end
redis.call('HSETNX', KEYS[1], 'eventlog', '[]')
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'progress')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[1]), -1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('PERSIST', KEYS[2]) end
return {'written'}
"""
)

# KEYS: state, eventlog. -> {'hash', fields, entries}, {'legacy', json} or {kind}
READ = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return {'legacy', redis.call('GET', KEYS[1])} end
if kind ~= 'hash' then return {kind} end
return {'hash', redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS: state, eventlog. ARGV: the legacy JSON as read, n, n field/value pairs, entries.
# The original's JSON string becomes our hash (its expiry kept) unless it changed meanwhile.
TAKE_OVER = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
local n = tonumber(ARGV[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + 2 * n))
if #ARGV > 2 + 2 * n then redis.call('RPUSH', KEYS[2], unpack(ARGV, 3 + 2 * n)) end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
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


SCRIPTS = {
    # a transition of a container's task also indexes the status it leaves (redis_operations)
    "create": indexing(CREATE, 2),
    "claim": indexing(CLAIM, 4),
    "finish": indexing(FINISH, 3),
    "update": indexing(UPDATE, 2),
    "append_event": APPEND_EVENT,
    "next_run": NEXT_RUN,
    "read": READ,
    "take_over": TAKE_OVER,
    "owned_lock": OWNED_LOCK,
    "refresh_locks": REFRESH_LOCKS,
}
#: a legacy state rewritten by an original worker between our read and our take-over: try again
TAKE_OVER_ATTEMPTS = 3


def _fields(data: dict[str, Any]) -> list[Any]:
    flat: list[Any] = []
    for key, value in data.items():
        flat += [key, orjson.dumps(value)]
    return flat


def _text(value: Any) -> str:
    """A reply as text (the client is not configured to decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@backoff.on_exception(
    backoff.expo, TRANSIENT, max_time=30, max_value=4, giveup=redis_client.is_auth_error, logger=logger
)
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
    except TRANSIENT as exc:
        if redis_client.is_auth_error(exc):
            raise  # refused credentials stay refused (redis-py counts them as connection errors)
        return await _retrying(call)


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
                    await self._subscribe(pubsub)
                    self.ready.set()
                    self._wake_all()  # a change made while we were not subscribed: re-read
                    await self._dispatch(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # wake everyone so they re-read the state, then resubscribe
                self.ready.clear()
                self._wake_all()
                if redis_client.is_auth_error(exc):
                    # refused credentials stay refused: stop here (the next watch() starts anew)
                    logger.error("Task state listener: %s", redis_client.describe_failure(exc))
                    return
                logger.warning("Task state listener lost its Redis connection; resubscribing")
                await asyncio.sleep(0.5)

    async def _subscribe(self, pubsub: Any) -> None:
        # redis-py returns once PSUBSCRIBE is sent; a change published before Redis ran it (on
        # another connection, it may run first) would wake nobody: wait for the confirmation
        await pubsub.psubscribe(self.pattern)
        while True:
            message = await pubsub.get_message(timeout=5)
            if message is not None and message["type"] == "psubscribe":
                return

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
        await cancel_and_wait([self.task])


@configure.utility(provides=IStateManagerUtility, name="redis")
class RedisStateManager(RedisOperations, StateManager):
    def __init__(self) -> None:
        super().__init__()
        self._client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._notifier: _Notifier | None = None
        self._pipe: RedisPipe | None = None
        self._opening: asyncio.Task[RedisPipe] | None = None
        self._legacy_adopted = False

    @property
    def prefix(self) -> str:
        return get_settings().redis_prefix_key

    async def client(self) -> Redis:
        if self._client is None:
            self._client = await redis_client.shared_client()
            for name, source in {**SCRIPTS, **OPERATIONS_SCRIPTS}.items():
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._client if self._client is not None else await self.client()
        return await _first_then_retrying(lambda: self._evalsha(client, script, keys, args))

    async def _evalsha(self, client: Redis, name: str, keys: list[str], args: list[Any]) -> Any:
        pipe = self._pipe
        if pipe is None or not pipe.usable or pipe.client is not client:
            pipe = await self._open_pipe(client)
        script = self._scripts[name]
        try:
            return await pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys=keys, args=args)  # scripts flushed, or a new server: loads it

    async def _open_pipe(self, client: Redis) -> RedisPipe:
        """The scripts' connection; concurrent callers wait for the same one to open."""
        opening = self._opening
        if opening is None or opening.get_loop() is not asyncio.get_running_loop():
            opening = self._opening = asyncio.create_task(RedisPipe.open(client))
        try:
            pipe: RedisPipe = await asyncio.shield(opening)
            self._pipe = pipe
        finally:
            if self._opening is opening and opening.done():
                self._opening = None
        return pipe

    async def _transition(
        self, script: str, task_id: str, keys: list[str], args: list[Any], indexed: bool = False
    ) -> list[Any]:
        """Run a state script (KEYS[1] = the state); take over the original's JSON state when found.
        `indexed`: the script also indexes the status it leaves (a container's task)."""
        for _ in range(TAKE_OVER_ATTEMPTS):
            index_keys, index_args = self._index_parts(task_id) if indexed else ([], [])
            found = await self._run(script, [*keys, *index_keys], [*args, *index_args])
            kind = _text(found[0])
            if kind == "legacy":
                await self._take_over(task_id)
                continue
            if kind == "wrongtype":
                kind = _text(found[1])
                raise TaskStateUnusable(f"task {task_id}: its key holds a Redis {kind}, not a state")
            return [kind, *found[1:]]
        raise TaskStateUnusable(f"task {task_id}: its legacy state kept changing while being taken over")

    async def _take_over(self, task_id: str) -> None:
        """Turn the original plugin's JSON string into our hash and event log list."""
        keys = self._state_keys(task_id)
        found = await self._run("read", keys, [])
        if _text(found[0]) != "legacy":
            return  # taken over meanwhile
        state = legacy_state(found[1], task_id)
        _adopt_run(state, task_id)
        entries = [orjson.dumps(entry) for entry in state.pop("eventlog")]
        fields = _fields({**state, "eventlog": []})
        await self._run("take_over", keys, [found[1], len(fields) // 2, *fields, *entries])

    async def adopt_legacy(self) -> None:
        """Once per process: the original's JSON states become ours and enter the container
        index, so the index-backed listing names them (one scan, the migration's only one)."""
        if self._legacy_adopted:
            return
        client = await self.client()
        base = self.prefix
        async for key in client.scan_iter(match=_glob_escape(base) + "*", count=1000, _type="string"):
            task_id = key.decode()[len(base) :]
            if names.is_task_key(task_id) and is_valid_task_id(task_id):
                await self._take_over(task_id)
                await self.index(task_id)
        self._legacy_adopted = True

    async def _call(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """`command(client)`, retried on transient errors."""
        client = self._client if self._client is not None else await self.client()
        return await _first_then_retrying(lambda: command(client))

    def _state_keys(self, task_id: str, prefix: str | None = None) -> list[str]:
        prefix = self.prefix if prefix is None else prefix
        return [names.state_key(prefix, task_id), names.eventlog_key(prefix, task_id)]

    # -- hot path ---------------------------------------------------------
    async def next_run(self, task_id: str) -> str:
        seconds, microseconds, stored = await self._run("next_run", self._state_keys(task_id)[:1], [])
        now_ns = int(seconds) * 10**9 + int(microseconds) * 1000
        return runs.next_run(now_ns, orjson.loads(stored))

    async def create(self, task_id: str, data: dict[str, Any]) -> bool:
        check_task_id(task_id)
        prefix = self.prefix
        args = [names.done_channel(prefix, task_id), orjson.dumps(data.get("run", "")), *_fields(data)]
        found = await self._transition(
            "create", task_id, self._state_keys(task_id, prefix), args, indexed=True
        )
        return found[0] == "created"

    async def claim(self, task_id: str, job_data: dict, lock_ttl: int, owner: str | None = None) -> Claim:
        config = get_settings()  # once per call (kept by get_settings until the block changes)
        prefix = config.redis_prefix_key
        run = job_data.get("run", "")
        initial = _fields(initial_state(run))
        running = _fields({"status": TaskStatus.RUNNING, "job_data": job_data, "updated": time.time()})
        channel = names.done_channel(prefix, task_id)
        args = [task_id, owner or self.worker_id, lock_ttl, config.state_ttl, channel, orjson.dumps(run)]
        args += [len(initial) // 2, *initial, *running]
        state, events = self._state_keys(task_id, prefix)
        keys = [state, names.lock_key(prefix, task_id), names.cancel_key(prefix), events]
        found = await self._transition("claim", task_id, keys, args, indexed=True)
        if found[0] == "future":
            raise RunFromTheFuture(task_id, run)
        detail = orjson.loads(found[1]) if len(found) > 1 and found[1] is not None else None
        if found[0] == CLAIMED:
            return Claim(CLAIMED, detail or 0, crashes=int(found[2]))
        return Claim(found[0], status=detail)

    async def finish(
        self,
        task_id: str,
        data: dict[str, Any],
        ttl: int | None,
        owner: str | None = None,
        run: str | None = None,
        only_open: bool = False,
    ) -> bool:
        prefix = self.prefix
        state, events = self._state_keys(task_id, prefix)
        args = [owner or self.worker_id, ttl or 0, names.done_channel(prefix, task_id)]
        args += [orjson.dumps(run) if run is not None else "", "open" if only_open else "", *_fields(data)]
        keys = [state, names.lock_key(prefix, task_id), events]
        found = await self._transition("finish", task_id, keys, args, indexed=True)
        return found[0] == "written"

    async def append_event(self, task_id: str, entry: list, limit: int) -> None:
        keys = self._state_keys(task_id)
        channel = names.done_channel(self.prefix, task_id)  # progress shows live on the dashboard
        await self._transition("append_event", task_id, keys, [limit, orjson.dumps(entry), channel])

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
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._notifier is not None:
            await self._notifier.close()
            self._notifier = None
        if self._client is not None:
            await self._client.aclose()  # ours, not guillotina's (which knows no password or TLS)
            self._client = None

    async def _clean(self) -> None:
        if not self.prefix:
            raise ValueError("redis_prefix_key is empty: cleaning would empty the whole database")
        client = await self.client()
        keys = [key async for key in client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])

    # -- IStateManagerUtility, as the original plugin had it --------------
    async def update(self, task_id: str, data: dict[str, Any], ttl: int | None = None) -> None:
        check_task_id(task_id)
        fields = dict(data)
        eventlog = fields.pop("eventlog", None)
        if eventlog is not None:
            fields["eventlog"] = []  # the entries live in the event log list
        pairs = _fields(fields)  # refuses what JSON cannot hold before anything is written
        entries = [orjson.dumps(entry) for entry in eventlog or ()]
        prefix = self.prefix
        args = [ttl or 0, self.state_ttl, names.done_channel(prefix, task_id)]
        publish = "status" in data or eventlog is not None  # progress too, live on the dashboard
        args += ["publish" if publish else "", "replace" if eventlog is not None else ""]
        args += [len(pairs) // 2, *pairs, *entries]
        keys = self._state_keys(task_id, prefix)
        await self._transition("update", task_id, keys, args, indexed="status" in data)

    async def get(self, task_id: str) -> dict[str, Any]:
        if not is_valid_task_id(task_id):
            return {}
        found = await self._run("read", self._state_keys(task_id), [])
        kind = _text(found[0])
        if kind == "legacy":
            return legacy_state(found[1], task_id)
        if kind != "hash":
            return {}
        flat = found[1]
        state = {_text(key): orjson.loads(value) for key, value in zip(flat[::2], flat[1::2])}
        if "eventlog" in state:
            state["eventlog"] = [orjson.loads(entry) for entry in found[2]]
        return state

    async def exists(self, task_id: str) -> bool:
        if not is_valid_task_id(task_id):
            return False
        key = names.state_key(self.prefix, task_id)
        return bool(await self._call(lambda client: client.exists(key)))

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        client = await self.client()
        base = self.prefix
        pattern = _glob_escape(base + prefix) + "*"
        # one scan for both layouts (our hashes, the original's strings); bookkeeping keys by name
        async for key in client.scan_iter(match=pattern, count=1000):
            name = key.decode()[len(base) :]
            if names.is_task_key(name):
                yield name

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

    async def claim_period(self, name: str, period: int, ttl: float, token: str) -> bool:
        key = names.periodic_key(self.prefix, name, period)
        if await self._call(lambda client: client.set(key, token, nx=True, px=max(1, round(ttl * 1000)))):
            return True
        # a retried SET may have found its own first attempt's key: that claim is ours
        return _text(await self._call(lambda client: client.get(key)) or b"") == token

    async def release_period(self, name: str, period: int) -> None:
        key = names.periodic_key(self.prefix, name, period)
        await self._call(lambda client: client.delete(key))

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


def _adopt_run(state: dict[str, Any], task_id: str) -> None:
    """A legacy state about one of our messages was written by an original worker: say so, keep its run."""
    job_data = state.get("job_data")
    run = job_data.get("run") if isinstance(job_data, dict) else None
    if isinstance(run, str) and run and "run" not in state:
        logger.error(
            "Task %s: an original guillotina_amqp worker ran one of our messages (JSON state found); "
            "rolling upgrades with original workers on the same queue are not supported: stop them",
            task_id,
        )
        state["run"] = run


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
