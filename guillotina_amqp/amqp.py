"""The broker connection of this process, as the original plugin named it.

`get_connection()` gives `(channel, transport, protocol)` of the connection `add_task`
publishes on, one per event loop, opened on first use (queues declared); the channel is
one of its own, kept for the caller (not the publisher's confirm channel) and opened
again if it closed. `remove_connection()` closes the connection; the next publish or
`get_connection()` opens a new one. Both are thin names over `publishing`.
"""

import asyncio
import weakref
from typing import NamedTuple

import aioamqp
from aioamqp.channel import Channel

from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.publishing import get_publisher, remove_publisher
from guillotina_amqp.settings import get_settings

_channels: "weakref.WeakKeyDictionary[AMQPConnection, Channel]" = weakref.WeakKeyDictionary()


class Connection(NamedTuple):
    """What the original's `get_connection()` returned, in its order."""

    channel: Channel
    transport: asyncio.BaseTransport
    protocol: aioamqp.AmqpProtocol


async def get_connection() -> Connection:
    """This loop's connection to the broker as `(channel, transport, protocol)`."""
    connection = await get_publisher(get_settings()).connect()
    channel = _channels.get(connection)
    if channel is None or not channel.is_open:
        channel = _channels[connection] = await connection.channel()
    assert connection.transport is not None and connection.protocol is not None
    return Connection(channel, connection.transport, connection.protocol)


async def remove_connection() -> None:
    """Close this loop's connection to the broker and forget it."""
    await remove_publisher(get_settings())
