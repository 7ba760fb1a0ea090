"""The worker: consume task messages, run them concurrently, settle each one once.

Every delivery is handled in its own asyncio task (aioamqp calls the consumer
from its frame reader, which must never wait on the broker). The worker's
`Handler` (handling.py) turns the delivery into a Disposition (ack, delay,
dead-letter, requeue, leave) and never touches the broker; `_dispose` is the
single place that acts on it. The worker keeps consuming, its slots and gate,
its life cycle and liveness.
"""

import asyncio
import contextlib
import contextvars
import logging
import uuid
from typing import Any, Awaitable, Callable, Iterable

from aioamqp.channel import Channel

from guillotina_amqp import liveness, names, periodic_tasks, recycling, redelivery
from guillotina_amqp.cancelling import cancel_and_wait
from guillotina_amqp.connection import CONNECTION_ERRORS, AMQPConnection
from guillotina_amqp.handling import Action, Delivery, Disposition, Handler, counted, message_priority
from guillotina_amqp.presence import Presence
from guillotina_amqp.publishing import Publisher, get_publisher
from guillotina_amqp.retrying import Backoff, retry
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.manager import get_state_manager
from guillotina_amqp.worker_compat import OriginalWorkerNames

logger = logging.getLogger("guillotina_amqp")

#: seconds a stopping worker waits for the broker to confirm each consumer's cancel
STOP_CONSUMING_TIMEOUT = 5.0
#: seconds to wait before handing back a message we could not send to the delay queue
REQUEUE_PAUSE = 1.0
#: consuming again (or stopping) after a failure: tried again every REQUEUE_PAUSE seconds
GATE_RETRY = Backoff(first=REQUEUE_PAUSE, doubling=False)


class Worker(OriginalWorkerNames):
    """Consumes `amqp.queue` (or the named `queues`) and runs up to `max_size` tasks at once."""

    def __init__(
        self,
        request: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        max_size: int | None = None,
        check_activity: bool = True,
        queues: Iterable[str] = (),
        max_tasks: int | None = None,
        max_load: float | None = None,
    ) -> None:
        self.request = request
        self.loop = loop
        self.settings = get_settings()
        #: the queues consumed ("default" is amqp.queue); ValueError for a name RabbitMQ would refuse
        self.queues = list(dict.fromkeys(names.task_queue(q, self.settings) for q in queues)) or [
            self.settings.queue
        ]
        #: what it consumes: those queues and their priority queues (none with quorum queues)
        self.consumed = self.queues + names.priority_queues(self.settings, self.queues)
        self.max_size = max_size or self.settings.max_running_tasks
        self._check_activity = check_activity
        self.update_status_interval = self.settings.update_status_interval
        self.state_manager = get_state_manager()
        self.worker_id = f"{uuid.uuid4().hex}"
        self.connection: AMQPConnection | None = None
        self.publisher: Publisher | None = None
        self._channel: Channel | None = None
        self._consumer_tags: set[str] = set()
        self._handlers: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._slots = asyncio.Semaphore(self.max_size)
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._consumer_cancelled = asyncio.Event()
        # liveness (docs/design.md#liveness): a failed check sets exit_code and `failed`; the command exits
        self.exit_code: int | None = None
        self.failed = asyncio.Event()
        self.beacon: liveness.Beacon | None = None
        #: tracks deliveries from the start; its loop runs only with check_activity
        self.activity = liveness.ActivityCheck(
            self.worker_id,
            self.settings.noop_after,
            self.settings.kill_after,
            # a paused worker (--max-load, --max-tasks) expects no delivery: not idle
            busy=lambda: bool(self._handlers) or not self.gate.open,
            publish=self._publish_probe,
            on_failure=self.fail,
        )
        self._activity_task: asyncio.Task | None = None
        self.probes_forwarded = 0
        self.presence = Presence(self)
        self.firer: periodic_tasks.Firer | None = None  # fires the periodic tasks
        # recycling and load (docs/operations.md): consume only while the gate is open
        self.quota = recycling.Quota(max_tasks)
        self.gate = recycling.Gate()
        self.load_watch = None
        if max_load is not None:
            self.load_watch = recycling.LoadWatch(max_load, self._on_load, self.worker_id)
        self.recycled = asyncio.Event()  # claimed max_tasks tasks and finished them
        #: every decision about a delivery; the slots, quota and gate stay ours
        self.handler = Handler(
            self.settings,
            self.state_manager,
            self.worker_id,
            self._slots,
            self.quota,
            self.gate,
            probe=self._on_probe,
        )
        self._running = self.handler.running
        #: copies redelivered while we run them (consumer_timeout): kept aside, no slot
        self.redelivered = self.handler.redelivered
        # a limit per channel (global) across several queues: RabbitMQ then offers each freed
        # slot to the blocked queues in random order; per consumer, the acked queue always won
        self.prefetch = redelivery.Prefetch(self.redelivered, self.max_size, shared=len(self.consumed) > 1)

    @property
    def connection_name(self) -> str:
        """How RabbitMQ lists our connection (client_properties.connection_name)."""
        return f"guillotina_amqp worker {self.worker_id} ({', '.join(self.queues)})"

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- life cycle ---------------------------------------------------------
    async def start(self) -> None:
        """Connect, declare the queues and start consuming; return once consuming."""
        self.connection = AMQPConnection(self.settings, name=self.connection_name, queues=self.consumed)
        await self.connection.open()
        self.publisher = Publisher(self.settings, self.connection)
        if self.load_watch is not None:
            self.load_watch.check()  # a loaded machine takes nothing, from the start
            self._background.append(asyncio.create_task(self.load_watch.run()))
        if self.gate.open:
            # the connection consumes again whenever it, our channel or our consumer is lost
            await self.connection.keep(self._consume)
        self._background.append(asyncio.create_task(self._gate_loop(consuming=self.gate.open)))
        self._background.append(asyncio.create_task(self._status_loop()))
        self._background.append(
            asyncio.create_task(redelivery.keep_prefetch(self.redelivered, self._reprefetch))
        )
        self._start_liveness()
        await self.presence.announce()
        self._start_periodic()
        logger.info(
            "Worker %s consuming %s (prefetch %s, state manager %s)",
            self.worker_id,
            ", ".join(self.queues),
            self.max_size,
            self.settings.persistent_manager,
        )

    def _start_liveness(self) -> None:
        assert self.connection is not None
        self.beacon = liveness.Beacon(self.connection, self.settings.beaconttl, self.fail)
        self._background.append(asyncio.create_task(self.beacon.run()))
        if self._check_activity:
            self._activity_task = asyncio.create_task(self.activity.run())

    def _start_periodic(self) -> None:
        tasks = periodic_tasks.registered()
        if tasks:
            self.firer = periodic_tasks.Firer(tasks, self.state_manager, self.worker_id)
            # an empty context: a firing is scheduled by no request, user or container
            self._background.append(asyncio.create_task(self.firer.run(), context=contextvars.Context()))

    def fail(self, exit_code: int, reason: str) -> None:
        """A liveness check failed: record why; `g amqp-worker` exits with `exit_code`."""
        if self.exit_code is None:
            logger.error("Worker %s is not live: %s; exiting with %s", self.worker_id, reason, exit_code)
            self.exit_code = exit_code
        self.failed.set()

    def _publisher(self) -> Publisher:
        """Ours once started; before (the original's handle_queued_job on a worker never
        started) this process's publisher, the one add_task uses."""
        if self.publisher is None:
            self.publisher = get_publisher(self.settings)
        return self.publisher

    async def _on_probe(self, body: bytes) -> None:
        if await liveness.handle_probe(body, self.worker_id, self.activity, self._publish_probe):
            self.probes_forwarded += 1

    async def _publish_probe(self, body: bytes) -> None:
        headers = {liveness.PROBE_HEADER: "1"}
        # into a queue we consume, so that it comes back to us
        await self._publisher().publish(body, self.queues[0], retries=0, headers=headers)

    async def _consume(self) -> dict[str, asyncio.Event]:
        """Consume on a new channel; return the events that tell it was lost.

        A channel can close while its connection stays open (a failed ack, RabbitMQ's
        consumer_timeout on a long task) and a consumer can be cancelled alone (its queue
        was deleted). The tasks of a closed channel go on; RabbitMQ requeued their messages,
        and the copies delivered to us are kept aside until the runs end (redelivery.py).
        """
        assert self.connection is not None
        if self._channel is None or not self._channel.is_open:  # an open one: consuming again
            self._channel = await self.connection.channel()
            await self.prefetch.apply(self._channel, new=True)
            self._channel.add_cancellation_callback(self._on_consumer_cancelled)
        self._consumer_cancelled = asyncio.Event()
        self._consumer_tags = set()
        for queue in self.consumed:
            result = await self._channel.basic_consume(self._consumer(queue), queue_name=queue)
            self._consumer_tags.add(result["consumer_tag"])
        return {"channel": self._channel.close_event, "consumer": self._consumer_cancelled}

    async def _reprefetch(self) -> None:
        if self._channel is not None and self._channel.is_open:
            await self.prefetch.apply(self._channel)

    def _consumer(self, queue: str) -> Callable[..., Awaitable[None]]:
        async def on_message(channel: Channel, body: bytes, envelope: Any, properties: Any) -> None:
            await self._on_message(channel, body, envelope, properties, queue)

        return on_message

    async def _gate_loop(self, consuming: bool) -> None:
        """Consume while the gate is open; stop consuming (what we hold unclaimed goes back) while held."""

        async def follow() -> None:
            nonlocal consuming
            if self.gate.open == consuming or self._stopping:
                return
            if self.gate.open:
                assert self.connection is not None
                await self.connection.keep(self._consume)
            else:
                await self._stop_consuming()
            consuming = not consuming

        def failed(exc: Exception, tries: int, pause: float) -> None:
            doing = "stop" if consuming else "resume"
            logger.error("Worker %s: could not %s consuming", self.worker_id, doing, exc_info=exc)

        while True:
            await self.gate.changed.wait()
            self.gate.changed.clear()
            await retry(follow, GATE_RETRY, (Exception,), on_retry=failed)

    def _on_load(self, high: bool) -> None:
        self.gate.hold(recycling.LOAD, high)

    async def _on_consumer_cancelled(self, channel: Channel, consumer_tag: str) -> None:
        # the broker cancels a consumer whose queue was deleted; the channel stays open
        if channel is self._channel and consumer_tag in self._consumer_tags:
            self._consumer_cancelled.set()

    async def join(self) -> None:
        """Wait until no task runs or waits on this worker."""
        while self._handlers:
            await self._idle.wait()

    def cancel_running(self) -> None:
        """Cancel the running tasks only; their messages stay unacked for redelivery."""
        for _, task in list(self._running.values()):
            task.cancel()

    def cancel(self) -> None:
        """Cancel every running task (their messages stay unacked) and background loop."""
        self.cancel_running()
        for task in [*self._handlers, *self._owned_loops()]:
            task.cancel()

    def _owned_loops(self) -> list[asyncio.Task]:
        # the activity loop may also have been started by the original's check_activity(...)
        return [*self._background, *([self._activity_task] if self._activity_task else [])]

    async def shutdown(self, timeout: float | None = None) -> None:
        """Graceful stop: consume no more, give running tasks `timeout` seconds
        (amqp.shutdown_timeout) to finish, then stop(): what still runs is
        canceled unacked, so the broker redelivers it to another worker."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        self._stopping = True
        await self._stop_consuming()
        running = {task_id: job.dotted_name for task_id, (job, _) in self._running.items()}
        if self._handlers:
            logger.info("Worker %s stopping: waiting up to %gs for %s", self.worker_id, timeout, running)
            try:
                await asyncio.wait_for(self.join(), timeout)
            except asyncio.TimeoutError:
                for job, _ in list(self._running.values()):
                    logger.warning(
                        "%s still running after %gs: canceled and left for redelivery",
                        job.label,
                        timeout,
                    )
        await self.stop()

    async def stop(self) -> None:
        """Cancel running tasks (left for redelivery) and close the connection."""
        self._stopping = True
        await self._stop_consuming()
        self.cancel_running()
        await cancel_and_wait([*self._handlers, *self._owned_loops()])
        self._background.clear()
        await self.presence.retire()
        if self.connection is not None:
            await self.connection.close()

    async def _stop_consuming(self) -> None:
        if self.connection is not None:
            self.connection.forget(self._consume)
        if self._channel is not None and self._channel.is_open:
            # a copy: a consumer being set up again meanwhile adds its tags to the set
            for consumer_tag in list(self._consumer_tags):
                # bounded: a broker that never answers must not hold a stopping worker for ever
                with contextlib.suppress(asyncio.TimeoutError, *CONNECTION_ERRORS):
                    await asyncio.wait_for(self._channel.basic_cancel(consumer_tag), STOP_CONSUMING_TIMEOUT)

    # -- one delivery ---------------------------------------------------------
    async def _on_message(
        self, channel: Channel, body: bytes, envelope: Any, properties: Any, queue: str | None = None
    ) -> None:
        # called from aioamqp's frame reader: hand the delivery over, never await the broker here
        self.activity.touch()
        delivery = Delivery(channel, body, envelope, properties, queue or self.queues[0])
        task = asyncio.create_task(self._handle(delivery))
        self._handlers.add(task)
        self._idle.clear()
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task) -> None:
        self._handlers.discard(task)
        if not self._handlers:
            self._idle.set()
        if not self._handlers and self.quota.done and not self.recycled.is_set():
            logger.info(
                "Worker %s ran its %s tasks (--max-tasks): recycling", self.worker_id, self.quota.limit
            )
            self.recycled.set()

    async def _handle(self, delivery: Delivery) -> None:
        await self._dispose(delivery, await self.handler.handle(delivery))

    async def _dispose(self, delivery: Delivery, disposition: Disposition) -> None:
        """The one place that acks, moves or leaves a message."""
        action, label = disposition.action, disposition.label
        if action is Action.ACK:
            await self._ack(delivery, label)
        elif action is Action.DEAD_LETTER:
            await self._move(delivery, label, names.error_queue(delivery.queue))
        elif action is Action.REQUEUE:
            await self._nack(delivery, label, requeue=True)
        elif action is Action.DELAY:
            await self._move(delivery, label, None, disposition.counter, disposition.delay_ms)

    async def _move(
        self,
        delivery: Delivery,
        label: str,
        queue: str | None,
        counter: str | None = None,
        delay_ms: int | None = None,
    ) -> None:
        """Republish to `queue` (None: the delay queue, or the delay tier for `delay_ms`),
        confirmed, counting why in a header, then ack the original.

        Dead letters are moved this way too, not nacked into the main queue's dead-letter
        exchange: RabbitMQ 3.10's dead-lettering crashes the queue process on a malformed
        `x-death` header, which any publisher can set. What we republish carries no
        broker-made death headers at all, so no queue ever reads a stranger's.
        """
        if not getattr(delivery.channel, "is_open", True):  # the original's test channels have none
            # the broker already requeued the original: a copy would make it run twice
            logger.warning("%s: not moved, its channel closed (RabbitMQ requeued it then)", label)
            return
        try:
            queue = queue or await self._delay_queue(delay_ms, delivery.queue)
            headers = counted(delivery.headers, counter)
            await self._publisher().publish(
                delivery.body,
                queue,
                retries=1,
                headers=headers,
                priority=message_priority(delivery.properties),
            )
        except Exception:
            # unacked on a live channel it would sit there until we disconnect: hand it back
            # to the main queue instead (after a pause, not to spin while the broker struggles)
            logger.exception("%s: could not publish to %s; requeueing it", label, queue or "a delay queue")
            await asyncio.sleep(REQUEUE_PAUSE)
            await self._nack(delivery, label, requeue=True)
            return
        await self._ack(delivery, label)

    async def _delay_queue(self, delay_ms: int | None, queue: str) -> str:
        """`queue`'s delay queue, or its delay tier for `delay_ms` (declared before use)."""
        if delay_ms is None:
            return names.delay_queue(queue)
        queue, arguments = names.delay_tier(self.settings, delay_ms, queue)
        await self._publisher().declare_queue(queue, arguments)
        return queue

    async def _ack(self, delivery: Delivery, label: str) -> None:
        try:
            await delivery.channel.basic_client_ack(delivery_tag=delivery.envelope.delivery_tag)
        except CONNECTION_ERRORS:
            # RabbitMQ requeues what a channel held when it closes: the copy finds the run ended
            logger.warning("%s: ack lost, its channel closed (RabbitMQ requeued it then)", label)

    async def _nack(self, delivery: Delivery, label: str, requeue: bool = False) -> None:
        try:
            await delivery.channel.basic_client_nack(
                delivery_tag=delivery.envelope.delivery_tag, requeue=requeue
            )
        except CONNECTION_ERRORS:
            logger.warning("%s: nack lost, its channel closed (RabbitMQ requeued it then)", label)

    # -- background loops -----------------------------------------------------
    async def _status_loop(self) -> None:
        """Refresh our locks and act on cancellations of running tasks."""
        while True:
            await asyncio.sleep(self.update_status_interval)
            try:
                await self.update_status()
            except Exception:
                logger.exception("Worker %s: status update failed", self.worker_id)

    async def update_status(self) -> None:
        await self.presence.announce()
        running = list(self._running)
        if not running:
            return
        await self.state_manager.refresh_locks(running, self.settings.lock_ttl, self.worker_id)
        for task_id in await self.state_manager.canceled_among(running):
            entry = self._running.get(task_id)
            if entry is not None:
                job, task = entry
                logger.info("%s canceled while running", job.label)
                job.cancel_requested = True
                task.cancel()
