"""Helpers shared by the tests: waiting on conditions, queue contents, clean-up."""

import asyncio
import contextlib
import io
import time
from typing import Any, Awaitable, Callable

import aioamqp
import pytest
from guillotina import app_settings
from guillotina.component import query_utility

from guillotina_amqp import names, publishing
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.interfaces import IStateManagerUtility
from guillotina_amqp.settings import QUORUM_SUFFIX, get_settings
from guillotina_amqp.worker import Worker


async def wait_for(condition: Callable[[], Awaitable[Any] | Any], timeout: float = 30, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def admin_channel(confirm: bool = False):
    """A channel on a connection of its own to this test's broker, closed afterwards."""
    connection = AMQPConnection(get_settings())
    await connection.open(max_time=10)
    try:
        yield await connection.channel(confirm=confirm)
    finally:
        await connection.close()


async def queue_counts() -> dict[str, int]:
    """Messages ready in the main, delay and error queues of this test."""
    counts = {}
    async with admin_channel() as channel:
        for queue in names.topology(get_settings()):
            found = await channel.queue_declare(queue, passive=True)
            counts[queue] = found["message_count"]
    return counts


async def error_queue_count() -> int:
    return (await queue_counts())[names.error_queue(get_settings().queue)]


async def take_dead_letter() -> dict:
    """The first message of the error queue, taken off it (aioamqp's basic_get answer)."""
    async with admin_channel() as channel:
        return await channel.basic_get(names.error_queue(get_settings().queue), no_ack=True)


async def publish_raw(body: bytes, headers: dict | None = None, routing_key: str | None = None) -> None:
    """Publish bytes straight to the task queue, as a third party could."""
    settings = get_settings()
    properties: dict[str, Any] = {"delivery_mode": 2}
    if headers:
        properties["headers"] = headers
    async with admin_channel(confirm=True) as channel:
        await channel.publish(body, settings.exchange, routing_key or settings.queue, properties=properties)


@contextlib.asynccontextmanager
async def running_worker(no_retries: bool = False, **kwargs: Any):
    """A started worker; `no_retries`: a failed task goes to the error queue at once."""
    worker = Worker(**kwargs)
    if no_retries:
        worker.max_task_retries = 0
    await worker.start()
    try:
        yield worker
    finally:
        await stopped(worker)


#: seconds a test worker may take to stop (its own bounds are 5 s per step)
STOP_LIMIT = 60


async def stopped(worker: Worker) -> None:
    """worker.stop(); a stop that hangs fails the test with every task's stack, not CI's clock."""
    stopping = asyncio.ensure_future(worker.stop())
    done, _ = await asyncio.wait({stopping}, timeout=STOP_LIMIT)
    if not done:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        raise AssertionError(f"worker.stop() still running after {STOP_LIMIT} s:\n{stacks.getvalue()}")
    stopping.result()


async def cleanup_namespace(namespace: str) -> None:
    """Delete the queues, exchange and Redis keys of one test; close its connections."""
    for publisher in list(publishing._publishers.values()):
        await publisher.close()
    publishing._publishers.clear()
    for name in ("memory", "redis"):
        manager = query_utility(IStateManagerUtility, name=name)
        if manager is not None:
            await manager.finalize()
    await _delete_queues(namespace)
    await _delete_keys(f"test-{namespace}-")
    from guillotina.contrib import redis as contrib_redis

    driver = contrib_redis._driver
    if driver is not None and driver.initialized:
        await driver.finalize()


async def _delete_queues(namespace: str) -> None:
    import os

    host, _, port = os.environ["RABBITMQ"].partition(":")
    try:
        transport, protocol = await aioamqp.connect(host=host, port=int(port))
    except OSError:
        return
    try:
        channel = await protocol.channel()
        queue = f"test-{namespace}"
        for main in (queue, queue + QUORUM_SUFFIX, names.priority_queue(queue)):
            for name in (main, names.delay_queue(main), names.error_queue(main)):
                await channel.queue_delete(name)
        await channel.exchange_delete(queue)
    finally:
        await protocol.close()
        transport.close()


async def _delete_keys(prefix: str) -> None:
    import os

    from redis.asyncio import Redis

    host, _, port = os.environ["REDIS"].partition(":")
    client = Redis(host=host, port=int(port))
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def amqp_block() -> dict:
    return dict(app_settings["amqp"])


def lines(path) -> list[str]:
    """The lines a task wrote to a marker file (none if it never ran)."""
    return path.read_text().splitlines() if path.exists() else []


def logged(caplog, *words: str) -> int:
    """How many captured log lines contain every one of `words`."""
    return sum(all(w in r.getMessage() for w in words) for r in caplog.records)


#: run a test once per state manager (the `namespace` fixture reads the `manager` param)
BOTH_MANAGERS = pytest.mark.parametrize("manager", ["memory", "redis"])
REDIS_ONLY = pytest.mark.parametrize("manager", ["redis"])


async def all_empty() -> bool:
    """Whether the main, delay and error queues of this test are all empty."""
    return set((await queue_counts()).values()) == {0}


async def redis_client():
    """A client of the tests' Redis server (close it with `aclose()`)."""
    import os

    from redis.asyncio import Redis

    host, _, port = os.environ["REDIS"].partition(":")
    return Redis(host=host, port=int(port))
