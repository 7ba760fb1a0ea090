"""An in-process stand-in for RabbitMQ, for the test suites of applications (and ours).

Point the connection factory at it in the test settings::

    settings["amqp"]["connection_factory"] = "guillotina_amqp.tests.mocks.connect"

and `add_task`, the worker (the `amqp_worker` fixture) and its beacons talk to a broker
living in the test's event loop instead of a RabbitMQ server. It keeps what this package
relies on: direct exchanges and bindings, queue declarations refused when their
arguments differ, publisher confirms and `basic.return` of unroutable mandatory
messages, prefetch, acks, nacks and rejects, redelivery of the unacked messages of a
closed channel, dead-lettering (with an `x-death` header), per-queue message TTLs and
exclusive queues. `get_broker().published` records every message published, in order.

`connect` has aioamqp.connect's signature. There is one broker per event loop (a test
gets a fresh loop, so a fresh broker); nothing is persisted.
"""

import asyncio
import itertools
import logging
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable, NoReturn

import aioamqp
import orjson
from aioamqp.envelope import Envelope, ReturnEnvelope
from aioamqp.properties import Properties
from aioamqp.protocol import CLOSED, OPEN

logger = logging.getLogger("guillotina_amqp.tests.mocks")

# AMQP reply codes the broker closes a channel with
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
NO_ROUTE = 312

_brokers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MockBroker]" = weakref.WeakKeyDictionary()


def get_broker() -> "MockBroker":
    """The mock broker of the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    broker = _brokers.get(loop)
    if broker is None:
        broker = _brokers[loop] = MockBroker()
    return broker


async def connect(
    host: str = "localhost",
    port: int | None = None,
    login: str = "guest",
    password: str = "guest",
    virtualhost: str = "/",
    ssl: Any = None,
    login_method: str = "PLAIN",
    insist: bool = False,
    protocol_factory: Any = None,
    verify_ssl: bool = True,
    loop: Any = None,
    **kwargs: Any,
) -> tuple["MockTransport", "MockProtocol"]:
    """A connection to this loop's mock broker, as aioamqp.connect returns one: (transport, protocol).

    The arguments are recorded in `protocol.parameters` and otherwise ignored.
    """
    parameters = {"host": host, "port": port, "login": login, "virtualhost": virtualhost, **kwargs}
    protocol = MockProtocol(get_broker(), parameters)
    return MockTransport(protocol), protocol


@dataclass
class Published:
    """One message as it was published."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Properties

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(eq=False)  # messages are told apart by identity, never by content
class _Message:
    body: bytes
    properties: Properties
    exchange: str
    routing_key: str
    redelivered: bool = False


@dataclass(eq=False)
class _Consumer:
    tag: str
    queue: "_Queue"
    channel: "MockChannel"
    callback: Callable[..., Awaitable[Any]]
    no_ack: bool


@dataclass(eq=False)
class _Queue:
    name: str
    arguments: dict[str, Any]
    owner: "MockProtocol | None"  # the connection of an exclusive queue
    ready: deque[_Message] = field(default_factory=deque)
    consumers: deque[_Consumer] = field(default_factory=deque)


class MockBroker:
    """Exchanges, queues and the messages in them, for one event loop."""

    def __init__(self) -> None:
        self.published: list[Published] = []
        self.connections: list[MockProtocol] = []
        self.exchanges: dict[str, str] = {"": "direct"}  # the default exchange routes by queue name
        self.bindings: dict[str, dict[str, set[str]]] = {}  # exchange -> routing key -> queues
        self.queues: dict[str, _Queue] = {}
        self._dispatch_scheduled = False

    def ready(self, queue: str) -> list[bytes]:
        """The bodies of the messages waiting in `queue` (not delivered, or delivered and requeued)."""
        return [message.body for message in self.queues[queue].ready]

    def drop_connections(self) -> None:
        """Close every open connection as a broker restart would (queued messages stay)."""
        for protocol in list(self.connections):
            protocol.lose()

    # -- routing ----------------------------------------------------------------
    def route(self, exchange: str, routing_key: str, body: bytes, properties: Properties) -> bool:
        """Put a copy of the message in every queue bound to `exchange` with `routing_key`."""
        if exchange == "":
            targets = {routing_key} & self.queues.keys()
        else:
            targets = self.bindings.get(exchange, {}).get(routing_key, set())
        for name in targets:
            self._enqueue(self.queues[name], _Message(body, properties, exchange, routing_key))
        return bool(targets)

    def _enqueue(self, queue: _Queue, message: _Message) -> None:
        queue.ready.append(message)
        ttl = queue.arguments.get("x-message-ttl")
        if ttl is not None:
            asyncio.get_running_loop().call_later(ttl / 1000, self._expire, queue, message)
        self.schedule_dispatch()

    def _expire(self, queue: _Queue, message: _Message) -> None:
        # only a message still waiting expires (RabbitMQ never expires a delivered one)
        if self.queues.get(queue.name) is queue and message in queue.ready:
            queue.ready.remove(message)
            self.dead_letter(queue, message, "expired")

    def requeue(self, queue: _Queue, message: _Message) -> None:
        message.redelivered = True
        queue.ready.appendleft(message)
        self.schedule_dispatch()

    def dead_letter(self, queue: _Queue, message: _Message, reason: str) -> None:
        """To the queue's dead-letter exchange, with an `x-death` entry; dropped without one."""
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None:
            return
        routing_key = queue.arguments.get("x-dead-letter-routing-key", message.routing_key)
        headers = dict(message.properties.headers or {})
        headers["x-death"] = _deaths(headers.get("x-death") or [], queue.name, reason, message)
        properties = Properties(**{name: getattr(message.properties, name) for name in Properties.__slots__})
        properties.headers = headers
        self.route(exchange, routing_key, message.body, properties)

    # -- delivery ---------------------------------------------------------------
    def schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        for queue in list(self.queues.values()):
            while queue.ready:
                consumer = _next_consumer(queue)
                if consumer is None:
                    break
                consumer.channel.deliver(consumer, queue.ready.popleft())

    # -- queues -----------------------------------------------------------------
    def delete_queue(self, name: str) -> int:
        queue = self.queues.pop(name, None)
        if queue is None:
            return 0
        for routes in self.bindings.values():
            for names in routes.values():
                names.discard(name)
        for consumer in list(queue.consumers):
            consumer.channel.cancelled_by_broker(consumer)
        return len(queue.ready)

    def connection_closed(self, protocol: "MockProtocol") -> None:
        if protocol in self.connections:
            self.connections.remove(protocol)
        for queue in [q for q in self.queues.values() if q.owner is protocol]:
            self.delete_queue(queue.name)


def _next_consumer(queue: _Queue) -> _Consumer | None:
    """The next consumer in turn whose channel may take one more message (prefetch)."""
    for _ in range(len(queue.consumers)):
        consumer = queue.consumers[0]
        queue.consumers.rotate(-1)
        if consumer.no_ack or consumer.channel.has_room():
            return consumer
    return None


def _deaths(deaths: list, queue: str, reason: str, message: _Message) -> list:
    """RabbitMQ's `x-death`: one entry per (queue, reason), counted, most recent first."""
    for death in deaths:
        if death.get("queue") == queue and death.get("reason") == reason:
            rest = [d for d in deaths if d is not death]
            return [{**death, "count": death.get("count", 1) + 1, "time": int(time.time())}, *rest]
    entry = {
        "count": 1,
        "reason": reason,
        "queue": queue,
        "time": int(time.time()),
        "exchange": message.exchange,
        "routing-keys": [message.routing_key],
    }
    return [entry, *deaths]


class MockChannel:
    """An aioamqp Channel's methods as this package and its tests call them."""

    def __init__(self, protocol: "MockProtocol", channel_id: int) -> None:
        self.protocol = protocol
        self.broker = protocol.broker
        self.channel_id = channel_id
        self.close_event = asyncio.Event()
        self.cancellation_callbacks: list[Callable[..., Awaitable[Any]]] = []
        self.return_callback: Callable[..., Awaitable[Any]] | None = None
        self.publisher_confirms = False
        self.prefetch_count = 0
        self._consumers: dict[str, _Consumer] = {}
        self._unacked: dict[int, tuple[_Queue, _Message]] = {}
        self._delivery_tags = itertools.count(1)
        # callbacks run one after the other, as aioamqp's frame reader runs them
        self._callbacks: asyncio.Queue[Callable[[], Awaitable[Any]] | None] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    @property
    def is_open(self) -> bool:
        return not self.close_event.is_set()

    def _check_open(self) -> None:
        if not self.is_open:
            raise aioamqp.ChannelClosed()

    def _fail(self, code: int, text: str) -> NoReturn:
        """What the broker does on a channel error: close the channel."""
        self.close_now()
        raise aioamqp.ChannelClosed(code, text)

    # -- exchanges and queues -------------------------------------------------------
    async def exchange_declare(
        self, exchange_name: str, type_name: str, passive: bool = False, durable: bool = False, **kwargs: Any
    ) -> bool:
        self._check_open()
        found = self.broker.exchanges.get(exchange_name)
        if passive and found is None:
            self._fail(NOT_FOUND, f"no exchange '{exchange_name}'")
        if found is not None and found != type_name and not passive:
            self._fail(PRECONDITION_FAILED, f"exchange '{exchange_name}' is of type {found}")
        self.broker.exchanges.setdefault(exchange_name, type_name)
        return True

    async def exchange_delete(self, exchange_name: str, **kwargs: Any) -> bool:
        self._check_open()
        self.broker.exchanges.pop(exchange_name, None)
        self.broker.bindings.pop(exchange_name, None)
        return True

    async def queue_declare(
        self,
        queue_name: str | None = None,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        no_wait: bool = False,
        arguments: dict | None = None,
    ) -> dict[str, Any]:
        self._check_open()
        name = queue_name or f"amq.gen-{uuid.uuid4().hex}"
        queue = self.broker.queues.get(name)
        if queue is None:
            if passive:
                self._fail(NOT_FOUND, f"no queue '{name}'")
            owner = self.protocol if exclusive else None
            queue = self.broker.queues[name] = _Queue(name, dict(arguments or {}), owner)
        elif queue.owner is not None and queue.owner is not self.protocol:
            self._fail(RESOURCE_LOCKED, f"queue '{name}' is exclusive to another connection")
        elif not passive and queue.arguments != dict(arguments or {}):
            self._fail(PRECONDITION_FAILED, f"queue '{name}' exists with other arguments")
        return {"queue": name, "message_count": len(queue.ready), "consumer_count": len(queue.consumers)}

    async def queue_bind(self, queue_name: str, exchange_name: str, routing_key: str, **kwargs: Any) -> bool:
        self._check_open()
        if queue_name not in self.broker.queues or exchange_name not in self.broker.exchanges:
            self._fail(NOT_FOUND, f"no queue '{queue_name}' or no exchange '{exchange_name}'")
        self.broker.bindings.setdefault(exchange_name, {}).setdefault(routing_key, set()).add(queue_name)
        return True

    async def queue_purge(self, queue_name: str, **kwargs: Any) -> dict[str, int]:
        self._check_open()
        queue = self.broker.queues[queue_name]
        count = len(queue.ready)
        queue.ready.clear()
        return {"message_count": count}

    async def queue_delete(self, queue_name: str, **kwargs: Any) -> bool:
        self._check_open()
        self.broker.delete_queue(queue_name)
        return True

    # -- publishing -------------------------------------------------------------
    async def confirm_select(self, *, no_wait: bool = False) -> bool:
        self._check_open()
        self.publisher_confirms = True
        return True

    async def publish(
        self,
        payload: bytes,
        exchange_name: str,
        routing_key: str,
        properties: dict | None = None,
        mandatory: bool = False,
        immediate: bool = False,
    ) -> None:
        """Route the message; an unroutable mandatory one comes back through `return_callback`
        before the publish returns (RabbitMQ sends basic.return before the confirm)."""
        self._check_open()
        if exchange_name not in self.broker.exchanges:
            self._fail(NOT_FOUND, f"no exchange '{exchange_name}'")
        message_properties = Properties(**(properties or {}))
        self.broker.published.append(Published(exchange_name, routing_key, payload, message_properties))
        routed = self.broker.route(exchange_name, routing_key, payload, message_properties)
        if not routed and mandatory and self.return_callback is not None:
            envelope = ReturnEnvelope(NO_ROUTE, "NO_ROUTE", exchange_name, routing_key)
            await self.return_callback(self, payload, envelope, message_properties)
        await asyncio.sleep(0)  # a round trip to the broker lets other tasks run

    basic_publish = publish

    # -- consuming --------------------------------------------------------------
    async def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0, **kwargs: Any) -> bool:
        self._check_open()
        self.prefetch_count = prefetch_count
        return True

    async def basic_consume(
        self,
        callback: Callable[..., Awaitable[Any]],
        queue_name: str = "",
        consumer_tag: str = "",
        no_ack: bool = False,
        **kwargs: Any,
    ) -> dict[str, str]:
        self._check_open()
        queue = self.broker.queues.get(queue_name)
        if queue is None:
            self._fail(NOT_FOUND, f"no queue '{queue_name}'")
        consumer = _Consumer(consumer_tag or f"ctag-{uuid.uuid4().hex}", queue, self, callback, no_ack)
        self._consumers[consumer.tag] = consumer
        queue.consumers.append(consumer)
        if self._reader is None:
            self._reader = asyncio.create_task(self._run_callbacks())
        self.broker.schedule_dispatch()
        return {"consumer_tag": consumer.tag}

    async def basic_cancel(self, consumer_tag: str, no_wait: bool = False) -> dict:
        self._check_open()
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is not None and consumer in consumer.queue.consumers:
            consumer.queue.consumers.remove(consumer)
        return {}

    def add_cancellation_callback(self, callback: Callable[..., Awaitable[Any]]) -> None:
        self.cancellation_callbacks.append(callback)

    def has_room(self) -> bool:
        return self.is_open and (not self.prefetch_count or len(self._unacked) < self.prefetch_count)

    def deliver(self, consumer: _Consumer, message: _Message) -> None:
        tag = next(self._delivery_tags)
        if not consumer.no_ack:
            self._unacked[tag] = (consumer.queue, message)
        envelope = Envelope(consumer.tag, tag, message.exchange, message.routing_key, message.redelivered)
        self._callbacks.put_nowait(
            partial(consumer.callback, self, message.body, envelope, message.properties)
        )

    def cancelled_by_broker(self, consumer: _Consumer) -> None:
        """The consumer's queue is gone: drop it and tell the cancellation callbacks."""
        self._consumers.pop(consumer.tag, None)
        for callback in self.cancellation_callbacks:
            self._callbacks.put_nowait(partial(callback, self, consumer.tag))

    async def _run_callbacks(self) -> None:
        while (call := await self._callbacks.get()) is not None:
            try:
                await call()
            except Exception:
                logger.exception("A consumer callback on mock channel %s failed", self.channel_id)

    # -- settling ---------------------------------------------------------------
    async def basic_client_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._settle(delivery_tag, multiple)

    async def basic_client_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True
    ) -> None:
        for queue, message in self._settle(delivery_tag, multiple):
            self._reject(queue, message, requeue)

    async def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        for queue, message in self._settle(delivery_tag, False):
            self._reject(queue, message, requeue)

    def _settle(self, delivery_tag: int, multiple: bool) -> list[tuple[_Queue, _Message]]:
        self._check_open()
        tags = [t for t in self._unacked if t <= delivery_tag] if multiple else [delivery_tag]
        if not tags or any(t not in self._unacked for t in tags):
            # RabbitMQ closes the channel: the frame itself was sent, so nothing is raised here
            logger.warning(
                "Mock channel %s: unknown delivery tag %s; closing it", self.channel_id, delivery_tag
            )
            self.close_now()
            return []
        self.broker.schedule_dispatch()  # room for more deliveries
        return [self._unacked.pop(t) for t in tags]

    def _reject(self, queue: _Queue, message: _Message, requeue: bool) -> None:
        if requeue:
            self.broker.requeue(queue, message)
        else:
            self.broker.dead_letter(queue, message, "rejected")

    # -- closing ----------------------------------------------------------------
    async def close(self, reply_code: int = 0, reply_text: str = "Normal Shutdown") -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close the channel: its consumers go, its unacked messages are requeued in order."""
        if not self.is_open:
            return
        self.close_event.set()
        for consumer in self._consumers.values():
            if consumer in consumer.queue.consumers:
                consumer.queue.consumers.remove(consumer)
        self._consumers.clear()
        for queue, message in reversed(list(self._unacked.values())):
            self.broker.requeue(queue, message)
        self._unacked.clear()
        while not self._callbacks.empty():  # not delivered yet: requeued above
            self._callbacks.get_nowait()
        self._callbacks.put_nowait(None)


class MockProtocol:
    """What this package uses of aioamqp's AmqpProtocol: state, channels, closing."""

    def __init__(self, broker: MockBroker, parameters: dict[str, Any]) -> None:
        self.broker = broker
        self.parameters = parameters
        self.state = OPEN
        self.connection_closed = asyncio.Event()
        self.channels: list[MockChannel] = []
        self._channel_ids = itertools.count(1)
        broker.connections.append(self)

    async def channel(self, **kwargs: Any) -> MockChannel:
        if self.state != OPEN:
            raise aioamqp.AmqpClosedConnection()
        channel = MockChannel(self, next(self._channel_ids))
        self.channels.append(channel)
        return channel

    async def close(self, no_wait: bool = False, timeout: float | None = None) -> None:
        self.lose()

    async def wait_closed(self, timeout: float | None = None) -> None:
        await self.connection_closed.wait()

    def lose(self) -> None:
        """The connection ends: its channels close, its exclusive queues are deleted."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        for channel in self.channels:
            channel.close_now()
        self.broker.connection_closed(self)
        self.connection_closed.set()


class MockTransport:
    def __init__(self, protocol: MockProtocol) -> None:
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.lose()

    def is_closing(self) -> bool:
        return self._protocol.state != OPEN

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
