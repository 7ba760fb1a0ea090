"""Publishing task messages with publisher confirms, reconnecting when the broker drops us."""

import asyncio
import logging
import uuid
from typing import Any

import aioamqp
from aioamqp.channel import Channel

from guillotina_amqp import message as messages
from guillotina_amqp.connection import CONNECTION_ERRORS, AMQPConnection
from guillotina_amqp.exceptions import MessageNotRouted
from guillotina_amqp.settings import AMQPSettings

logger = logging.getLogger("guillotina_amqp")


class Publisher:
    """A connection and a confirm-mode channel that publish persistent messages.

    `publish` returns only once RabbitMQ confirmed the message; a closed
    connection or channel is replaced and the publish tried again.
    """

    def __init__(self, settings: AMQPSettings, connection: AMQPConnection | None = None) -> None:
        self.settings = settings
        self.connection = connection
        self._owns_connection = connection is None
        self._channel: Channel | None = None
        self._lock = asyncio.Lock()
        self._returned: set[str] = set()

    async def _ready_channel(self) -> Channel:
        if self._channel is not None and self._channel.is_open and self._connection_open():
            return self._channel
        async with self._lock:
            if self._channel is None or not self._channel.is_open or not self._connection_open():
                if not self._owns_connection and not self._connection_open():
                    raise aioamqp.AmqpClosedConnection()  # its owner (the worker) reconnects it
                if self._owns_connection and not self._connection_open():
                    queues: set[str] = set()
                    if self.connection is not None:
                        queues = self.connection.queues  # the named queues it published to
                        await self.connection.close()
                    self.connection = AMQPConnection(
                        self.settings,
                        name=f"guillotina_amqp publisher ({self.settings.queue})",
                        queues=queues,
                    )
                    await self.connection.open(max_time=10)
                assert self.connection is not None
                self._channel = await self.connection.channel(confirm=True)
                self._channel.return_callback = self._on_return
        return self._channel

    def _connection_open(self) -> bool:
        return self.connection is not None and self.connection.is_open

    async def connect(self) -> AMQPConnection:
        """The publisher's connection, opened (with the queues declared) if it was not."""
        await self._ready_channel()
        assert self.connection is not None
        return self.connection

    async def declare(self, queue: str) -> None:
        """Make sure `queue` (a named queue, or amqp.queue) and its delay and error queues exist."""
        await (await self.connect()).add_queue(queue)

    async def publish(
        self, body: bytes, routing_key: str, retries: int = 3, headers: dict | None = None
    ) -> None:
        """Publish `body` persistently to the exchange; return once RabbitMQ confirmed it.

        A closed connection or channel is replaced and the publish tried again, up to
        `retries` times. A message the broker confirms but cannot route (its queue was
        deleted since we declared it) would be lost: the queues are declared again and
        the message published once more, else MessageNotRouted.
        """
        properties = self._properties(body, headers)
        redeclared = False
        attempt = 0
        while True:
            try:
                channel = await self._ready_channel()
                await channel.publish(
                    body, self.settings.exchange, routing_key, properties=properties, mandatory=True
                )
            except CONNECTION_ERRORS as exc:
                self._channel = None
                if attempt >= retries:
                    raise
                attempt += 1
                logger.warning("Publish to %s failed (%r); retrying over a new channel", routing_key, exc)
                continue
            if properties["message_id"] not in self._returned:
                return
            self._returned.discard(properties["message_id"])
            if redeclared:
                raise MessageNotRouted(
                    f"no queue bound to {routing_key!r} on exchange {self.settings.exchange!r}"
                )
            redeclared = True
            logger.warning("Publish to %s was not routed; declaring the queues again", routing_key)
            assert self.connection is not None
            await self.connection.declare_topology()

    def _properties(self, body: bytes, headers: dict | None) -> dict[str, Any]:
        # message_id tells which publish a basic.return is about
        properties: dict[str, Any] = {
            "delivery_mode": 2,
            "content_type": "application/json",
            "message_id": uuid.uuid4().hex,
        }
        all_headers = {**messages.sign_headers(body, self.settings), **(headers or {})}
        if all_headers:
            properties["headers"] = all_headers
        return properties

    async def _on_return(self, channel: Channel, body: bytes, envelope: Any, properties: Any) -> None:
        # the broker sends basic.return before the confirm of the same message
        self._returned.add(properties.message_id)

    async def close(self) -> None:
        if self._owns_connection and self.connection is not None:
            await self.connection.close()
        self._channel = None


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
