"""Liveness of a worker process (docs/design.md#liveness): beacons, activity check, loop watchdog.

A worker that is alive but useless (its connection stuck, its consumer no
longer receiving, its event loop hogged by a task) must exit non-zero so its
supervisor restarts it. Each check here reports such a failure through a
callback, `on_failure(exit_code, reason)`; only the loop watchdog kills the
process itself, because a blocked loop cannot run any callback.

The exit codes of `g amqp-worker` are defined here, in one place (docs/operations.md#exit-codes).
"""

import asyncio
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import aioamqp
import orjson
from aioamqp.channel import Channel

from guillotina_amqp import metrics, names
from guillotina_amqp.connection import CONNECTION_ERRORS, AMQPConnection
from guillotina_amqp.exceptions import InvalidMessage

logger = logging.getLogger("guillotina_amqp.liveness")

EXIT_OK = 0  #: stopped by SIGTERM/SIGINT, running tasks finished or left for redelivery
EXIT_STARTUP_FAILED = 2  #: could not start (broker unreachable, bad configuration...)
EXIT_BEACON_LOST = 3  #: no beacon came back within 3 x beaconttl: the connection is stuck
EXIT_IDLE = 4  #: nothing (not even its own no-op probe) reached the consumer for kill_after s
EXIT_LOOP_BLOCKED = 5  #: the event loop did not run for --auto-kill-timeout s

#: exit_code(reason) -> called once when a check fails
FailureCallback = Callable[[int, str], None]

#: marks a no-op probe; whom it is for travels in the body, which signing covers
PROBE_HEADER = "x-guillotina-amqp-probe"
#: a probe bounces between workers until its sender takes it; give up after this many hops
MAX_PROBE_HOPS = 50


class Beacon:
    """A message that round-trips through the broker every `ttl` seconds on one connection.

    Published to `beacon-delay-<uuid>`, it dead-letters into `beacon-<uuid>`
    after `ttl` seconds, where this connection consumes it and sends the next.
    When the worker reconnects, the beacon follows the new connection.
    """

    def __init__(self, connection: AMQPConnection, ttl: float, on_failure: FailureCallback) -> None:
        self.connection = connection
        self.ttl = float(ttl)
        self.on_failure = on_failure
        self.received = 0
        self.queue: str | None = None
        self.delay_queue: str | None = None
        self.last_seen = time.monotonic()
        self._channel: Channel | None = None
        self._arrived = asyncio.Event()
        connection.on_reconnected(self._forget_channel)

    @property
    def deadline(self) -> float:
        return self.last_seen + 3 * self.ttl

    async def run(self) -> None:
        """Send beacons until cancelled; report a failure when one stays away past the deadline."""
        self.last_seen = time.monotonic()
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await self._round_trip()
            except TimeoutError:
                self.on_failure(
                    EXIT_BEACON_LOST,
                    f"no beacon came back on {self.queue} within {3 * self.ttl:g}s: the connection is stuck",
                )
                return
            except CONNECTION_ERRORS as exc:
                # the connection reconnects; the deadline keeps running meanwhile
                logger.debug("Beacon on %s interrupted (%r); retrying", self.queue, exc)
                await asyncio.sleep(min(self.ttl, 1))

    async def _forget_channel(self) -> None:
        self._channel = None  # it died with the old connection: declare new queues

    async def _round_trip(self) -> None:
        if self._channel is None or not self._channel.is_open:
            await self._declare()
        channel = self._channel
        assert channel is not None
        self._arrived.clear()
        await channel.publish(b"beacon", names.BEACON_EXCHANGE, self.delay_queue)
        arrived = asyncio.ensure_future(self._arrived.wait())
        # the channel closes with its connection
        closed = asyncio.ensure_future(channel.close_event.wait())
        try:
            await asyncio.wait({arrived, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
            closed.cancel()
        if not self._arrived.is_set():
            raise ConnectionError("channel closed while the beacon travelled")

    async def _declare(self) -> None:
        """Exclusive beacon queues on this connection (they vanish with it)."""
        self.queue, self.delay_queue = names.beacon_queues(uuid.uuid4().hex)
        channel = self._channel = await _beacon_exchange_channel(self.connection)
        await channel.queue_declare(self.queue, exclusive=True)
        await channel.queue_declare(
            self.delay_queue,
            exclusive=True,
            arguments={
                "x-dead-letter-exchange": names.BEACON_EXCHANGE,
                "x-dead-letter-routing-key": self.queue,
                "x-message-ttl": int(self.ttl * 1000),  # milliseconds
            },
        )
        for queue in (self.queue, self.delay_queue):
            await channel.queue_bind(queue, names.BEACON_EXCHANGE, routing_key=queue)
        await channel.basic_consume(self._on_beacon, queue_name=self.queue, no_ack=True)
        logger.info(
            "Beacons on %s every %gs (exit after %gs without one)", self.queue, self.ttl, 3 * self.ttl
        )

    async def _on_beacon(self, channel: Channel, body: bytes, envelope: Any, properties: Any) -> None:
        now = time.monotonic()
        logger.debug("Beacon back on %s after %.2fs", self.queue, now - self.last_seen)
        self.last_seen = now
        self.received += 1
        metrics.beacon_received()
        self._arrived.set()


async def _beacon_exchange_channel(connection: AMQPConnection) -> Channel:
    """A channel on which the `beacon` exchange exists.

    Use the exchange as found (another deployment may have declared it durable,
    and a re-declaration with other flags would be refused); create it if missing.
    """
    channel = await connection.channel()
    try:
        await channel.exchange_declare(names.BEACON_EXCHANGE, "direct", passive=True)
        return channel
    except aioamqp.ChannelClosed:  # NOT_FOUND closes the channel
        channel = await connection.channel()
        await channel.exchange_declare(names.BEACON_EXCHANGE, "direct", durable=False)
        return channel


class ActivityCheck:
    """Exit when nothing reaches the worker's consumer for `kill_after` idle seconds.

    After `noop_after` idle seconds (no task running, no delivery) the worker
    publishes a no-op probe to the main queue, addressed to itself in a header.
    Another worker receiving it sends it on (the broker spreads it among
    consumers) until its sender gets it back, so the probe proves that THIS
    worker's consumer still receives, however many workers share the queue.
    """

    def __init__(
        self,
        worker_id: str,
        noop_after: float,
        kill_after: float,
        busy: Callable[[], bool],
        publish: Callable[[bytes], Awaitable[None]],
        on_failure: FailureCallback,
    ) -> None:
        self.worker_id = worker_id
        self.busy = busy
        self.publish = publish
        self.on_failure = on_failure
        self.last_activity = time.monotonic()
        self.probes_sent = 0
        self.probes_back = 0
        self._last_probe = 0.0
        self.configure(noop_after, kill_after)

    def configure(self, noop_after: float | None = None, kill_after: float | None = None) -> None:
        """Set the idle limits (None keeps one) and the pace that follows from them."""
        if noop_after is not None:
            self.noop_after = float(noop_after)
        if kill_after is not None:
            self.kill_after = float(kill_after)
        # a few probes fit between noop_after and kill_after
        self.probe_every = max((self.kill_after - self.noop_after) / 3, 0.1)
        self.interval = min(max(min(self.noop_after, self.kill_after) / 4, 0.05), 5.0)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    async def run(self, interval: float | None = None) -> None:
        """Check every `interval` seconds (default: a quarter of the shorter limit) until not live."""
        while True:
            await asyncio.sleep(self.interval if interval is None else interval)
            if not await self.check():
                return

    async def check(self) -> bool:
        """One round: past `noop_after` idle seconds send a probe, past `kill_after` report
        the failure. Return whether the worker is still live."""
        if self.busy():
            self.touch()
            return True
        now = time.monotonic()
        idle = now - self.last_activity
        if idle >= self.kill_after:
            self.on_failure(
                EXIT_IDLE,
                f"nothing reached the consumer for {idle:.0f}s (kill_after {self.kill_after:g}s), "
                "not even its own no-op probe",
            )
            return False
        if idle >= self.noop_after and now - self._last_probe >= self.probe_every:
            self._last_probe = now
            await self._send_probe()
        return True

    async def _send_probe(self) -> None:
        try:
            await self.publish(probe_body(self.worker_id, hops=0))
        except Exception as exc:
            logger.warning("Worker %s could not publish its no-op probe: %r", self.worker_id, exc)
            return
        self.probes_sent += 1
        logger.debug("Worker %s idle: no-op probe sent", self.worker_id)

    def probe_returned(self) -> None:
        self.probes_back += 1
        logger.debug("Worker %s: no-op probe came back", self.worker_id)


def probe_body(sender: str, hops: int) -> bytes:
    return orjson.dumps({"probe": sender, "hops": hops})


def is_probe(headers: dict | None) -> bool:
    return headers is not None and PROBE_HEADER in headers


async def handle_probe(
    body: bytes,
    own_id: str,
    activity: ActivityCheck | None,
    forward: Callable[[bytes], Awaitable[None]],
) -> bool:
    """Take our own probe back, or send another worker's on towards its sender (caller acks).

    Return whether the probe was sent on; InvalidMessage for a malformed one.
    """
    try:
        found = orjson.loads(body)
        sender, hops = str(found["probe"]), int(found["hops"]) + 1
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        raise InvalidMessage("malformed no-op probe") from None
    if sender == own_id:
        if activity is not None:
            activity.probe_returned()
        return False
    if hops > MAX_PROBE_HOPS:
        logger.debug("No-op probe of worker %s dropped after %s hops", sender, hops - 1)
        return False
    await forward(probe_body(sender, hops))
    return True


class LoopWatchdog:
    """Kills the process when its event loop has not run for `timeout` seconds.

    A coroutine on the loop stamps the time; a thread outside the loop checks
    the stamp. A task that blocks the loop (CPU work, time.sleep) stops the
    stamps, and nothing on the loop could react, so the thread exits with
    os._exit: unacked messages go back to the queue and the supervisor restarts us.
    """

    def __init__(self, timeout: float, exit: Callable[[int], Any] = os._exit) -> None:
        self.timeout = float(timeout)
        self._exit = exit
        self._tick = min(self.timeout / 4, 1.0)
        self._stamp = time.monotonic()
        self._stopped = threading.Event()
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stamp = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())
        self._thread = threading.Thread(target=self._watch, name="amqp-loop-watchdog", daemon=True)
        self._thread.start()
        logger.info("Loop watchdog: the process exits if the event loop blocks for %gs", self.timeout)

    def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()

    async def _heartbeat(self) -> None:
        while True:
            self._stamp = time.monotonic()
            await asyncio.sleep(self._tick)

    def _watch(self) -> None:
        while not self._stopped.wait(self._tick):
            blocked = time.monotonic() - self._stamp
            if blocked > self.timeout:
                logger.critical(
                    "Event loop blocked for %.1fs (--auto-kill-timeout %gs): exiting with %s",
                    blocked,
                    self.timeout,
                    EXIT_LOOP_BLOCKED,
                )
                _flush_logs()
                self._exit(EXIT_LOOP_BLOCKED)
                return


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers + logger.handlers:
        try:
            handler.flush()
        except Exception:  # noqa: S110 - best effort before dying
            pass
    sys.stderr.flush()
