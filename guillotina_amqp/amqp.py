"""The broker connection of this process (names kept from the original plugin).

`get_connection()` is the connection `add_task` publishes on, one per event loop,
opened on first use; `remove_connection()` closes it, and the next publish or
`get_connection()` opens a new one. Both are thin names over `publishing`.
"""

from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.publishing import get_publisher, remove_publisher
from guillotina_amqp.settings import get_settings


async def get_connection() -> AMQPConnection:
    """This loop's connection to the broker, with the queues declared.

    `.channel()` opens a channel on it; `.protocol` and `.transport` are aioamqp's.
    """
    return await get_publisher(get_settings()).connect()


async def remove_connection() -> None:
    """Close this loop's connection to the broker and forget it."""
    await remove_publisher(get_settings())
