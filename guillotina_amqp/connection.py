"""Connections to RabbitMQ: connect to any broker, declare the topology, stay connected.

Reconnecting lives here, as in aio-pika's RobustConnection: a lost connection
is opened again (the next broker of `amqp.hosts` first), the topology declared
again, and then its users are told. `on_reconnected` listeners drop what they
held on the old connection; `keep` subscriptions have their set-up run again,
also when only the channel or consumer they returned is lost.
"""

import asyncio
import dataclasses
import inspect
import logging
import random
import weakref
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import aioamqp
from aioamqp.channel import Channel
from guillotina.utils import resolve_dotted_name

from guillotina_amqp import names, tls
from guillotina_amqp.cancelling import cancel_and_wait
from guillotina_amqp.exceptions import InvalidSettings, TLSFailure
from guillotina_amqp.retrying import Backoff, log_giveup, retry
from guillotina_amqp.settings import AMQPSettings

logger = logging.getLogger("guillotina_amqp")
T = TypeVar("T")

#: What a broken connection or channel raises; callers reconnect on these.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    aioamqp.AmqpClosedConnection,
    aioamqp.ChannelClosed,
    ConnectionError,
    OSError,
)
#: What closing a connection may raise besides: a broker that never answers the close.
_CLOSE_ERRORS: tuple[type[Exception], ...] = (asyncio.TimeoutError, *CONNECTION_ERRORS)
#: seconds to wait for one broker to accept a connection before trying the next
CONNECT_TIMEOUT = 10.0

#: told that the connection is back (topology declared again)
Listener = Callable[[], Awaitable[None]]
#: sets up what a subscriber needs on the connection; returns {what: event set once it is lost}
Setup = Callable[[], Awaitable[dict[str, asyncio.Event]]]
#: reconnecting: 1, 2, 4 s... at most 5 s apart, each drawn at random below that (full jitter)
RECONNECT = Backoff(first=1, cap=5, jitter=True)


def is_tls_failure(exc: Exception) -> bool:
    """A TLS connection refused (a certificate, either side) stays refused: not worth retrying."""
    return isinstance(exc, TLSFailure)


async def retrying(
    call: Callable[[], Awaitable[T]],
    max_time: float | None,
    giveup: Callable[[Exception], bool] = lambda exc: False,
) -> T:
    """`await call()`, retried on CONNECTION_ERRORS with exponential backoff (RECONNECT) for up
    to `max_time` seconds (None: until it works or `giveup(error)`). An error `giveup` accepts
    is raised without a "Giving up" line: the caller reports it (naming the setting to fix)."""
    log = log_giveup(getattr(call, "__name__", repr(call)))

    def gave_up(exc: Exception, tries: int) -> None:
        if not giveup(exc):
            log(exc, tries)

    policy = dataclasses.replace(RECONNECT, max_time=max_time)
    return await retry(call, policy, CONNECTION_ERRORS, giveup, on_giveup=gave_up)


class AMQPConnection:
    """One connection to a broker, with its queues (docs/design.md#queues) declared, reconnected
    (to any broker of `amqp.hosts`) from open() until close()."""

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
        self._addresses = settings.addresses()
        #: amqp.ssl's context (None: plain TCP); built now, so a missing CA file stops us at once
        self._ssl = tls.client_context(settings.ssl) if settings.ssl is not None else None
        # connections start on a random broker, so workers spread over the cluster's nodes
        self._current = random.randrange(len(self._addresses))
        self._listeners: list[Listener] = []
        self._kept: dict[Setup, dict[str, asyncio.Event]] = {}
        self._kept_changed = asyncio.Event()
        self._supervisor: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """host:port/vhost of the broker this connection uses (or tries next)."""
        host, port = self._addresses[self._current]
        return f"{host}:{port}{self.settings.vhost}"

    @property
    def is_open(self) -> bool:
        return self.protocol is not None and self.protocol.state == aioamqp.protocol.OPEN

    async def open(self, max_time: float = 60) -> None:
        """Connect to a broker, retrying with exponential backoff for up to `max_time` seconds,
        and declare the topology; from then on, reconnect whenever the connection is lost.

        A certificate refused, either side, is not retried: TLSFailure at once (once open, a
        reconnection keeps trying: a certificate may be renewed meanwhile)."""
        await retrying(self._connect_any, max_time, giveup=is_tls_failure)
        try:
            await self.declare_topology()
        except BaseException:
            await self._drop()  # no half-open connection left behind
            raise
        self._supervisor = asyncio.create_task(self._supervise())

    def on_reconnected(self, listener: Listener) -> None:
        """Await `listener()` after every reconnection (the topology declared again)."""
        self._listeners.append(listener)

    async def keep(self, setup: Setup) -> None:
        """Run `setup()` now, and again after every reconnection or when one of the events it
        returned is set while the connection stays open (the topology declared again first:
        a deleted queue cancels its consumers)."""
        self._kept[setup] = await setup()
        self._kept_changed.set()

    def forget(self, setup: Setup) -> None:
        """Run `setup` no more."""
        self._kept.pop(setup, None)
        self._kept_changed.set()

    async def wait_open(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Return once the connection is open; ConnectionError after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not self.is_open:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise ConnectionError(f"no RabbitMQ connection to {self.address} within {timeout:g}s") from None

    async def _connect_any(self) -> None:
        """Try each broker once, the current one first; raise the last error if none answers."""
        error: Exception = ConnectionError("no broker")
        for _ in self._addresses:
            host, port = self._addresses[self._current]
            try:
                await asyncio.wait_for(self._connect(host, port), CONNECT_TIMEOUT)
                return
            except CONNECTION_ERRORS as exc:
                error = await self._tls_failure(exc, host, port) or exc
                if isinstance(error, TLSFailure):
                    logger.warning("%s could not connect to RabbitMQ: %s", self.name, error)
                else:
                    logger.warning("%s could not connect to RabbitMQ at %s: %r", self.name, self.address, exc)
                self._current = (self._current + 1) % len(self._addresses)
        raise error

    async def _tls_failure(self, exc: Exception, host: str, port: int) -> TLSFailure | None:
        """A TLSFailure when TLS is why the attempt failed with `exc` (a certificate either side
        refused, a plain-TCP port): never retried over plain TCP, the operator asked for TLS."""
        if self._ssl is None or self.settings.ssl is None:
            return None
        failure = await tls.failure_behind(exc, host, port, self._ssl)
        if failure is None:
            return None
        why = tls.describe_failure(failure, self.settings.ssl)
        return TLSFailure(f"TLS to RabbitMQ at {self.address} (amqp.ssl): {why}")

    async def _connect(self, host: str, port: int) -> None:
        s = self.settings
        factory = resolve_dotted_name(s.connection_factory)  # type: ignore[arg-type]  # a callable passes as is
        self.transport, self.protocol = await factory(
            host=host,
            port=port,
            login=s.login,
            password=s.password,
            virtualhost=s.vhost,
            **self._tls_option(factory),
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

    def _tls_option(self, factory: Callable[..., Any]) -> dict[str, Any]:
        """{"ssl": context} with amqp.ssl; a factory that cannot take it is refused, since dropping
        it would connect over plain TCP."""
        if self._ssl is None:
            return {}
        if not _accepted_by(factory, ssl=True):
            raise InvalidSettings("amqp.ssl is set, but amqp.connection_factory takes no 'ssl' argument")
        return {"ssl": self._ssl}

    async def channel(self, confirm: bool = False) -> Channel:
        """A new channel; in confirm mode when `confirm` (publishes wait for the broker)."""
        if self.protocol is None or not self.is_open:
            raise ConnectionError(f"no open RabbitMQ connection to {self.address}")
        channel = await self.protocol.channel()
        remember_close_reason(channel)
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

    # -- staying connected ----------------------------------------------------
    async def _supervise(self) -> None:
        while True:
            lost = await self._wait_for_loss()
            if lost:
                await self._restore_lost(lost)
                continue
            logger.warning("%s lost its RabbitMQ connection to %s; reconnecting", self.name, self.address)
            # fail over: the next broker first (one that was killed refuses at once anyway)
            self._current = (self._current + 1) % len(self._addresses)
            await retrying(self._reopen, None)
            logger.info("%s reconnected to RabbitMQ at %s", self.name, self.address)
            for listener in list(self._listeners):
                try:
                    await listener()
                except Exception:
                    logger.exception("%s: a reconnection listener failed", self.name)
            for setup in list(self._kept):
                await self._restore(setup)

    async def _wait_for_loss(self) -> list[tuple[Setup, str]]:
        """Wait until the connection is lost ([]) or, while it stays open, a kept subscription's
        channel or consumer ([(setup, what was lost)])."""
        assert self.protocol is not None
        while self.is_open:
            self._kept_changed.clear()
            events = [self.protocol.connection_closed, self._kept_changed]
            events += [event for kept in self._kept.values() for event in kept.values()]
            waits = [asyncio.ensure_future(event.wait()) for event in events]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            # a closing connection closes its channels first: judge by the connection
            lost = [
                (s, lost_what(what, e))
                for s, kept in self._kept.items()
                for what, e in kept.items()
                if e.is_set()
            ]
            if lost and self.is_open:
                return lost
        return []

    async def _restore_lost(self, lost: list[tuple[Setup, str]]) -> None:
        for setup, what in lost:
            logger.warning("%s lost its RabbitMQ %s; setting it up again", self.name, what)
        try:
            await self.declare_topology()
        except CONNECTION_ERRORS as exc:
            logger.warning("%s could not declare the queues again: %r", self.name, exc)
        for setup in dict(lost):
            await self._restore(setup)

    async def _restore(self, setup: Setup) -> None:
        if setup not in self._kept:
            return  # forgotten meanwhile
        try:
            kept = await retrying(setup, None, giveup=lambda exc: not self.is_open)
        except CONNECTION_ERRORS:
            return  # the connection went down meanwhile: restored after the reconnection
        except Exception:
            # a bug, not the broker: give up on it (a worker's activity check notices it idles)
            logger.exception("%s could not set up %r again; giving up on it", self.name, setup)
            self.forget(setup)
            return
        if setup in self._kept:
            self._kept[setup] = kept
            logger.info("%s set up again on RabbitMQ at %s", self.name, self.address)

    async def _reopen(self) -> None:
        await self._drop()
        await self._connect_any()
        await self.declare_topology()

    async def _drop(self) -> None:
        protocol, transport, self.protocol, self.transport = self.protocol, self.transport, None, None
        if protocol is not None and protocol.state == aioamqp.protocol.OPEN:
            try:
                await asyncio.wait_for(protocol.close(), 5)
            except _CLOSE_ERRORS:
                pass
        if transport is not None:
            transport.close()

    async def close(self) -> None:
        """Close the connection and stop reconnecting it."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await cancel_and_wait([supervisor])
        await self._drop()


#: why RabbitMQ closed a channel, by the channel's close_event (what `keep` subscriptions return)
_close_reasons: "weakref.WeakKeyDictionary[asyncio.Event, str]" = weakref.WeakKeyDictionary()


def remember_close_reason(channel: Channel) -> None:
    """Keep the reply code and text of the broker's Channel.Close (aioamqp hands them only to
    the calls still waiting on the channel, as a ChannelClosed): the log line says why."""
    closed = getattr(channel, "connection_closed", None)
    if closed is None:  # a stand-in channel (the tests' mock broker)
        return

    def connection_closed(server_code: Any = None, server_reason: Any = None, exception: Any = None) -> None:
        if server_code is not None and not channel.close_event.is_set():
            reason = aioamqp.ChannelClosed(server_code, server_reason)
            _close_reasons[channel.close_event] = f"{reason.code} {reason.message}"
        closed(server_code, server_reason, exception)

    channel.connection_closed = connection_closed  # type: ignore[method-assign]


def close_reason(event: asyncio.Event) -> str | None:
    """RabbitMQ's reply code and text for the channel whose close_event this is, if it said."""
    return _close_reasons.get(event)


def lost_what(what: str, event: asyncio.Event) -> str:
    """How the log names a lost subscription part: with RabbitMQ's reason when it gave one."""
    reason = close_reason(event)
    return f"{what} (closed by RabbitMQ: {reason})" if reason else what


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
        self._loop = asyncio.get_running_loop()  # the connection's; frames are written on it only

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
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
        await declare_queue(channel, settings, name, arguments)


async def declare_queue(channel: Channel, settings: AMQPSettings, queue: str, arguments: dict) -> None:
    """Declare a durable queue bound to the exchange under its own name (idempotent)."""
    await channel.queue_declare(queue, durable=True, arguments=arguments)
    await channel.queue_bind(queue, settings.exchange, routing_key=queue)
