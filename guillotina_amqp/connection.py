"""Connections to RabbitMQ: connect with backoff, declare the topology once, reconnect."""

import asyncio
import inspect
import logging
from typing import Any, Callable, Iterable

import aioamqp
import backoff
from aioamqp.channel import Channel
from guillotina.utils import resolve_dotted_name

from guillotina_amqp import names
from guillotina_amqp.settings import AMQPSettings

logger = logging.getLogger("guillotina_amqp")

#: What a broken connection or channel raises; callers reconnect on these.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    aioamqp.AmqpClosedConnection,
    aioamqp.ChannelClosed,
    ConnectionError,
    OSError,
)
#: What closing a connection may raise besides: a broker that never answers the close.
_CLOSE_ERRORS: tuple[type[Exception], ...] = (asyncio.TimeoutError, *CONNECTION_ERRORS)


class AMQPConnection:
    """One connection to the broker, with the queues of SPEC §3 declared on it."""

    def __init__(
        self,
        settings: AMQPSettings,
        on_error: Callable[[Exception], Any] | None = None,
        name: str = "guillotina_amqp",
        queues: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self._on_error = on_error
        #: the queues whose topology this connection declares (amqp.queue unless told others)
        self.queues: set[str] = set(queues) or {settings.queue}
        #: shown by `rabbitmqctl list_connections name client_properties` (connection_name)
        self.name = name
        self.transport: asyncio.BaseTransport | None = None
        self.protocol: aioamqp.AmqpProtocol | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}{self.settings.vhost}"

    @property
    def is_open(self) -> bool:
        return self.protocol is not None and self.protocol.state == aioamqp.protocol.OPEN

    async def open(self, max_time: float = 60) -> None:
        """Connect, retrying with exponential backoff for up to `max_time` seconds."""
        connect = backoff.on_exception(
            backoff.expo, CONNECTION_ERRORS, max_time=max_time, max_value=5, logger=logger
        )(self._connect)
        await connect()
        await self.declare_topology()

    async def _connect(self) -> None:
        s = self.settings
        factory = resolve_dotted_name(s.connection_factory)  # type: ignore[arg-type]  # a callable passes as is
        self.transport, self.protocol = await factory(
            host=s.host,
            port=s.port,
            login=s.login,
            password=s.password,
            virtualhost=s.vhost,
            **_accepted_by(
                factory,
                heartbeat=s.heartbeat,
                on_error=self._on_error,
                client_properties={"connection_name": self.name},
            ),
        )
        if isinstance(getattr(self.protocol, "_stream_writer", None), asyncio.StreamWriter):
            self.protocol._stream_writer = CoalescingWriter(self.protocol._stream_writer)
        logger.info("Connected to RabbitMQ at %s", self.address)

    async def channel(self, confirm: bool = False) -> Channel:
        """A new channel; in confirm mode when `confirm` (publishes wait for the broker)."""
        assert self.protocol is not None, "connection not open"
        channel = await self.protocol.channel()
        if confirm:
            await channel.confirm_select()
            settle_multiple_confirms(channel)
        return channel

    async def declare_topology(self) -> None:
        """Declare the exchange and the main, delay and error queues of each of our queues (idempotent)."""
        await self._declare(sorted(self.queues))

    async def add_queue(self, queue: str) -> None:
        """Declare a named queue's topology once; it is declared again with the others on reconnection."""
        if queue not in self.queues:
            await self._declare([queue])
            self.queues.add(queue)

    async def _declare(self, queues: list[str]) -> None:
        channel = await self.channel()
        try:
            for queue in queues:
                await declare_queues(channel, self.settings, queue)
        finally:
            await channel.close()

    async def close(self) -> None:
        protocol, transport, self.protocol, self.transport = self.protocol, self.transport, None, None
        if protocol is not None and protocol.state == aioamqp.protocol.OPEN:
            try:
                await asyncio.wait_for(protocol.close(), 5)
            except _CLOSE_ERRORS:
                pass
        if transport is not None:
            transport.close()


def _accepted_by(factory: Callable[..., Any], **options: Any) -> dict[str, Any]:
    """The `options` a connection factory takes: all of them with aioamqp.connect's signature
    (its **kwargs reach the protocol), else those it names (a factory written for the
    original plugin may take only host, port, login, password and virtualhost)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: assume aioamqp's signature
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {name: value for name, value in options.items() if name in parameters}


class CoalescingWriter:
    """Sends the frames written during one event-loop iteration in one socket write.

    aioamqp writes a publish as three frames and every ack as one, each write a
    send() system call plus a heartbeat timer reset. Buffering them until the
    loop's next turn keeps their order and makes the acks of tasks that end
    together, or the publishes of concurrent add_task callers, share one write.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._writer.is_closing():
                self._writer.write(data)

    async def drain(self) -> None:
        # the buffer goes out on the loop's next turn; wait only if the socket pushes back
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def settle_multiple_confirms(channel: Channel) -> None:
    """Make a confirm-mode channel honour acks and nacks that confirm several publishes.

    RabbitMQ confirms concurrent publishes in batches (`multiple`: every tag up
    to this one); aioamqp 0.15 settles only the named tag, so the other
    publishers would wait for ever.
    """

    async def settle(frame: Any, error: BaseException | None) -> None:
        tags = [frame.delivery_tag]
        if frame.multiple:
            tags = [t for t in _waiting_tags(channel) if t <= frame.delivery_tag]
        for tag in tags:
            waiter = channel._futures.pop(f"basic_server_ack_{tag}", None)
            if waiter is not None and not waiter.done():
                if error is None:
                    waiter.set_result(True)
                else:
                    waiter.set_exception(error)

    async def ack(frame: Any) -> None:
        await settle(frame, None)

    async def nack(frame: Any, delivery_tag: int | None = None) -> None:
        await settle(frame, aioamqp.exceptions.PublishFailed(frame.delivery_tag))

    # the channel dispatches frames through its bound methods: instance attributes win
    channel.basic_server_ack = ack  # type: ignore[method-assign]
    channel.basic_server_nack = nack  # type: ignore[method-assign]


def _waiting_tags(channel: Channel) -> list[int]:
    prefix = "basic_server_ack_"
    return [int(name[len(prefix) :]) for name in list(channel._futures) if name.startswith(prefix)]


async def declare_queues(channel: Channel, settings: AMQPSettings, queue: str | None = None) -> None:
    await channel.exchange_declare(settings.exchange, "direct", durable=True)
    for name, arguments in names.topology(settings, queue).items():
        await channel.queue_declare(name, durable=True, arguments=arguments)
        await channel.queue_bind(name, settings.exchange, routing_key=name)
