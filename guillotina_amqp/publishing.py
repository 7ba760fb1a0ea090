"""Publishing task messages with publisher confirms, over a connection that reconnects itself."""

import asyncio
import functools
import logging
import uuid
from typing import Any

from aioamqp.channel import Channel
from aioamqp.exceptions import PublishFailed

from guillotina_amqp import message as messages
from guillotina_amqp import names
from guillotina_amqp.connection import CONNECTION_ERRORS, AMQPConnection, declare_queue, is_tls_failure
from guillotina_amqp.exceptions import MessageNotRouted
from guillotina_amqp.retrying import Attempts, Backoff, retry, silently
from guillotina_amqp.settings import AMQPSettings

logger = logging.getLogger("guillotina_amqp")

#: seconds before the first retry of a failed publish; doubled for each next one
RETRY_PAUSE = 0.5
#: what a publish is tried again on: a lost connection or channel, a nack
PUBLISH_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, PublishFailed)


@functools.lru_cache(maxsize=16)
def _backoff(retries: int) -> Backoff:
    """The pauses of a publish tried `retries` more times (made once: add_task's hot path)."""
    return Backoff(first=RETRY_PAUSE, max_tries=retries + 1)


class Publisher:
    """A connection and a confirm-mode channel that publish persistent messages.

    `publish` returns only once RabbitMQ confirmed the message; a closed channel is
    replaced (once the connection is back, if it was lost) and the publish tried again.
    """

    def __init__(self, settings: AMQPSettings, connection: AMQPConnection | None = None) -> None:
        self.settings = settings
        self.connection = connection
        self._owns_connection = connection is None
        self._channel: Channel | None = None
        self._lock = asyncio.Lock()
        self._returned: set[str] = set()
        if connection is not None:
            connection.on_reconnected(self._forget_channel)

    async def _ready_channel(self) -> Channel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        async with self._lock:
            if self._channel is None or not self._channel.is_open:
                connection = await self._open_connection()
                self._channel = await connection.channel(confirm=True)
                self._channel.return_callback = self._on_return
        return self._channel

    async def _open_connection(self) -> AMQPConnection:
        """Our connection, opened on first use; it reconnects itself, we wait for it."""
        if self.connection is None:
            connection = AMQPConnection(
                self.settings, name=f"guillotina_amqp publisher ({self.settings.queue})"
            )
            await connection.open(max_time=10)
            connection.on_reconnected(self._forget_channel)
            self.connection = connection
        await self.connection.wait_open()
        return self.connection

    async def _forget_channel(self) -> None:
        self._channel = None  # it died with the old connection

    async def connect(self) -> AMQPConnection:
        """The publisher's connection, opened (with the queues declared) if it was not."""
        await self._ready_channel()
        assert self.connection is not None
        return self.connection

    async def declare(self, queue: str) -> None:
        """Make sure `queue` (a named queue, or amqp.queue) and its delay and error queues exist."""
        await (await self.connect()).add_queue(queue)

    async def publish(
        self,
        body: bytes,
        routing_key: str,
        retries: int = 3,
        headers: dict | None = None,
        priority: int | None = None,
        sign: bool = True,
    ) -> None:
        """Publish `body` persistently to the exchange; return once RabbitMQ confirmed it.

        `priority`: the message's AMQP priority (what a priority queue orders by). `sign`:
        False to pass on a message as it is, signature header included (a requeued dead letter).

        A closed connection or channel is replaced and the publish tried again, up to
        `retries` times, 0.5, 1, 2... s apart; so is a publish the broker refused (nack), not
        a TLS connection refused (TLSFailure at once).
        A message the broker confirms but cannot route (its queue was deleted since we
        declared it) would be lost: the queues are declared again and the message
        published once more, else MessageNotRouted.
        """
        properties = self._properties(body, headers, sign)
        if priority is not None:
            properties["priority"] = priority

        async def attempt() -> None:
            try:
                channel = await self._ready_channel()
                await channel.publish(
                    body, self.settings.exchange, routing_key, properties=properties, mandatory=True
                )
            except CONNECTION_ERRORS:
                self._channel = None  # a nack (PublishFailed) leaves the channel open
                raise

        def retrying(exc: Exception, tries: int, pause: float) -> None:
            logger.warning("Publish to %s failed (%r); retrying (%s of %s)", routing_key, exc, tries, retries)

        # time for a lost connection to be noticed and replaced, or for a quorum queue to elect
        # a new leader (it refuses publishes meanwhile); a publish again after declaring counts too
        attempts = Attempts(_backoff(retries))
        for redeclared in (False, True):
            await retry(
                attempt, attempts, PUBLISH_ERRORS, is_tls_failure, on_retry=retrying, on_giveup=silently
            )
            if properties["message_id"] not in self._returned:
                return
            self._returned.discard(properties["message_id"])
            if redeclared:
                raise MessageNotRouted(
                    f"no queue bound to {routing_key!r} on exchange {self.settings.exchange!r}"
                )
            logger.warning("Publish to %s was not routed; declaring the queues again", routing_key)
            assert self.connection is not None
            await self.connection.declare_topology()

    async def declare_queue(self, queue: str, arguments: dict) -> None:
        """Declare (and bind) a queue outside the fixed topology, e.g. a delay tier."""
        await declare_queue(await self._ready_channel(), self.settings, queue, arguments)

    def _properties(self, body: bytes, headers: dict | None, sign: bool = True) -> dict[str, Any]:
        # message_id tells which publish a basic.return is about
        properties: dict[str, Any] = {
            "delivery_mode": 2,
            "content_type": "application/json",
            "message_id": uuid.uuid4().hex,
        }
        signed = messages.sign_headers(body, self.settings) if sign else {}
        all_headers = {**signed, **(headers or {})}
        if all_headers:
            properties["headers"] = all_headers
        return properties

    async def _on_return(self, channel: Channel, body: bytes, envelope: Any, properties: Any) -> None:
        # the broker sends basic.return before the confirm of the same message
        self._returned.add(properties.message_id)

    async def close(self) -> None:
        if self._owns_connection and self.connection is not None:
            await self.connection.close()
            self.connection = None
        self._channel = None


async def publish_task(
    body: bytes,
    settings: AMQPSettings,
    queue: str,
    wait_ms: int | None = None,
    retries: int = 3,
    priority: int | None = None,
    headers: dict | None = None,
) -> None:
    """A task message to `queue` (its priority queue for a task given a priority), or into the
    delay tier a task waiting for its start sits in (which dead-letters it there later); a
    named or priority queue is declared first. `headers`: the message's own (trace context)."""
    publisher = get_publisher(settings)
    if priority is not None:
        queue = names.priority_queue(queue)
    if queue != settings.queue:
        await publisher.declare(queue)
    target = queue
    if wait_ms is not None:
        target, arguments = names.delay_tier(settings, wait_ms, queue)
        await publisher.declare_queue(target, arguments)
    await publisher.publish(body, target, retries=retries, headers=headers, priority=priority)


_publishers: dict[tuple, Publisher] = {}


async def remove_publisher(settings: AMQPSettings) -> None:
    """Close and forget this loop's publisher for `settings` (the next publish opens a new one)."""
    publisher = _publishers.pop((id(asyncio.get_running_loop()), settings), None)
    if publisher is not None:
        await publisher.close()


def get_publisher(settings: AMQPSettings) -> Publisher:
    """This process's publisher for the broker and queues of `settings` (one per event loop)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), settings)
    publisher = _publishers.get(key)
    if publisher is None:
        for stale in [k for k in _publishers if k[0] != id(loop)]:
            del _publishers[stale]  # their loop is gone (tests make a loop per test)
        publisher = _publishers[key] = Publisher(settings)
    return publisher
