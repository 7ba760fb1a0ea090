"""pytest fixtures for applications' test suites (names kept from the original plugin).

In the application's conftest.py::

    pytest_plugins = ["guillotina.tests.fixtures", "guillotina_amqp.tests.fixtures"]

- `amqp_worker`: a Worker consuming `amqp.queue` in the test's process and event loop,
  started after the application (`guillotina_main`, which loads your settings) and
  stopped after the test; tasks the test schedules run on it.
- `amqp_channel`: an aioamqp channel on a connection of its own to the configured broker.

With `amqp.connection_factory: "guillotina_amqp.tests.mocks.connect"` in the test settings
both use the in-process mock broker and no RabbitMQ is needed. Needs pytest and
pytest-asyncio (the `test` extra).
"""

from typing import Any, AsyncIterator

import pytest_asyncio
from aioamqp.channel import Channel

from guillotina_amqp import amqp
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.settings import get_settings
from guillotina_amqp.worker import Worker


@pytest_asyncio.fixture
async def amqp_worker(guillotina_main: Any) -> AsyncIterator[Worker]:
    """A started worker; afterwards it stops (tasks still running are canceled) and the
    test's publishing connection is closed."""
    worker = Worker()
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
        await amqp.remove_connection()


@pytest_asyncio.fixture
async def amqp_channel(guillotina_main: Any) -> AsyncIterator[Channel]:
    """A channel to the broker, on a connection closed after the test."""
    connection = AMQPConnection(get_settings(), name="guillotina_amqp test channel")
    await connection.open(max_time=10)
    try:
        yield await connection.channel()
    finally:
        await connection.close()
