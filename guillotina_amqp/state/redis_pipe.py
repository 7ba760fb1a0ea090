"""One pipelined Redis connection for the state scripts.

Every script call of a loop turn goes out in one write, and replies are matched
to their callers in order (Redis answers a connection's commands in the order it
got them), read by the protocol's `data_received` with hiredis' C parser. No
connection checkout, coroutine or timer per command: the worker's per-task cost
of Redis was mostly redis-py's pipeline machinery, not the round trip.

The connection is the client's own: the same address, database, credentials and TLS
context (the master the Sentinels name, when the client is a Sentinel one). A lost or
silent connection fails every waiting call with redis-py's ConnectionError or
TimeoutError, which the state manager's retries already handle: the next call
opens a new connection.
"""

import asyncio
import collections
import ssl
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guillotina_amqp.state.redis_client import SOCKET_TIMEOUT

#: server errors that mean something to the caller: the script cache was flushed; a server still
#: loading its data (a ConnectionError to redis-py: retried); a master demoted to a replica;
#: credentials refused, or none given to a server that wants them (never retried)
_REPLY_ERRORS = {
    "NOSCRIPT": NoScriptError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "WRONGPASS": AuthenticationError,
    "NOAUTH": AuthenticationError,
}


def _reply_error(message: str) -> Exception:
    return _REPLY_ERRORS.get(message.partition(" ")[0], ResponseError)(message)


def _ssl_context(pool: Any) -> ssl.SSLContext | None:
    """The TLS context the client's own connections use (None: plain TCP), so that the pipe
    checks the server's certificate exactly as redis-py does."""
    # building a connection object opens nothing; its context is made from the client's options
    context = getattr(pool.make_connection(), "ssl_context", None)
    return context.get() if context is not None else None


class RedisPipe(asyncio.Protocol):
    """`await pipe.call(*command)`: sent with the other calls of the loop turn, answered in order."""

    def __init__(self, client: Redis, timeout: float = SOCKET_TIMEOUT) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=_reply_error)
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.outgoing: list[bytes] = []
        self.closed: Exception | None = None
        self._last_reply = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, client: Redis) -> "RedisPipe":
        """A connection to the server `client` talks to, authenticated and on its database."""
        pool = client.connection_pool
        options = pool.connection_kwargs
        pipe = cls(client)
        try:
            if options.get("path"):
                connecting = pipe.loop.create_unix_connection(lambda: pipe, options["path"])
            else:
                if isinstance(pool, SentinelConnectionPool):
                    host, port = await pool.get_master_address()
                else:
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                tls = _ssl_context(pool)
                connecting = pipe.loop.create_connection(lambda: pipe, host, port, ssl=tls)
            await asyncio.wait_for(connecting, pipe.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis for the task state: {exc!r}") from exc
        try:
            await pipe._handshake(options)
        except BaseException:
            pipe.close()  # refused credentials or database: no half-open connection left
            raise
        return pipe

    async def _handshake(self, options: dict[str, Any]) -> None:
        password, username = options.get("password"), options.get("username")
        if password:
            await self.call("AUTH", *([username] if username else []), password)
        if options.get("db"):
            await self.call("SELECT", options["db"])

    @property
    def usable(self) -> bool:
        return self.closed is None and self.loop is asyncio.get_running_loop()

    def call(self, *command: Any) -> asyncio.Future:
        """The reply to `command` (a ResponseError reply is raised), as a future."""
        future = self.loop.create_future()
        if self.closed is not None:
            future.set_exception(self.closed)
            return future
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        if not self.waiting:
            self._last_reply = self.loop.time()  # silence counts from when a reply is first owed
        self.outgoing.append(hiredis.pack_command(command))
        self.waiting.append(future)
        return future

    def _flush(self) -> None:
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is None or self.closed is not None:
            return  # the futures of these commands were failed with the connection
        self.transport.write(data)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.timeout, self._check_silence)

    def _check_silence(self) -> None:
        """Every `timeout` s while replies are owed: a server silent that long counts as down."""
        self._watchdog = None
        if not self.waiting:
            return
        silent = self.loop.time() - self._last_reply
        if silent >= self.timeout:
            self._fail(RedisTimeoutError(f"Redis sent no reply for {silent:.1f} s"))
        else:
            self._watchdog = self.loop.call_later(self.timeout - silent, self._check_silence)

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self._last_reply = self.loop.time()
        while self.waiting:
            reply = self.reader.gets()
            if reply is False:
                return
            if isinstance(reply, ReadOnlyError):
                # a Sentinel failover demoted our server: a new connection asks them again
                self._fail(RedisConnectionError(f"Redis server of the task state is a replica now: {reply}"))
                return
            future = self.waiting.popleft()
            if future.done():
                continue  # its caller was cancelled
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Redis connection of the task state lost: {exc!r}"))

    def _fail(self, error: Exception) -> None:
        if self.closed is None:
            self.closed = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._fail(RedisConnectionError("Redis connection of the task state closed"))
