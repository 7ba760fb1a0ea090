"""The worker: consume task messages, run them concurrently, settle each one once.

Every delivery is handled in its own asyncio task (aioamqp calls the consumer
from its frame reader, which must never wait on the broker). `_settle` is the
single place that decides what happens to a message: ack, retry through the
delay queue, or nack into the error queue.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, NamedTuple

from aioamqp.channel import Channel

from guillotina_amqp import liveness, metrics, names
from guillotina_amqp import message as messages
from guillotina_amqp.connection import CONNECTION_ERRORS, AMQPConnection
from guillotina_amqp.exceptions import InvalidMessage
from guillotina_amqp.job import Job, Outcome
from guillotina_amqp.presence import Presence
from guillotina_amqp.publishing import Publisher
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state.manager import CLAIMED, LOCKED, get_state_manager
from guillotina_amqp.state.status import TaskStatus

logger = logging.getLogger("guillotina_amqp")

#: seconds to wait before handing back a message we could not send to the delay queue
REQUEUE_PAUSE = 1.0


class Delivery(NamedTuple):
    channel: Channel
    body: bytes
    envelope: Any
    properties: Any

    @property
    def headers(self) -> dict | None:
        return getattr(self.properties, "headers", None)


class Worker:
    """Consumes `amqp.queue` and runs up to `max_size` tasks at once (SPEC §4)."""

    def __init__(
        self,
        request: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        max_size: int | None = None,
        check_activity: bool = True,
    ) -> None:
        self.request = request
        self.loop = loop
        self.settings = get_settings()
        self.max_size = max_size or self.settings.max_running_tasks
        self.check_activity = check_activity
        self.max_task_retries = self.settings.max_task_retries
        self.update_status_interval = self.settings.update_status_interval
        self.state_manager = get_state_manager()
        self.worker_id = f"{uuid.uuid4().hex}"
        self.total_run = 0
        self.total_errored = 0
        self.connection: AMQPConnection | None = None
        self.publisher: Publisher | None = None
        self._channel: Channel | None = None
        self._consumer_tag: str | None = None
        self._running: dict[str, tuple[Job, asyncio.Task]] = {}
        self._handlers: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._slots: asyncio.Semaphore | None = None
        self._idle: asyncio.Event | None = None
        self._stopping = False
        self._consumer_cancelled = asyncio.Event()
        # liveness (SPEC §6): a failed check sets exit_code and `failed`; the command exits
        self.exit_code: int | None = None
        self.failed = asyncio.Event()
        self.beacon: liveness.Beacon | None = None
        self.activity: liveness.ActivityCheck | None = None
        self.probes_forwarded = 0
        self.presence = Presence(self)

    @property
    def connection_name(self) -> str:
        """How RabbitMQ lists our connection (client_properties.connection_name)."""
        return f"guillotina_amqp worker {self.worker_id} ({self.settings.queue})"

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- life cycle ---------------------------------------------------------
    async def start(self) -> None:
        """Connect, declare the queues and start consuming; return once consuming."""
        self._slots = asyncio.Semaphore(self.max_size)
        self._idle = asyncio.Event()
        self._idle.set()
        self.connection = AMQPConnection(self.settings, name=self.connection_name)
        await self.connection.open()
        await self._consume()
        self._background.append(asyncio.create_task(self._status_loop()))
        self._background.append(asyncio.create_task(self._reconnect_loop()))
        self._start_liveness()
        await self.presence.announce()
        logger.info(
            "Worker %s consuming %s (prefetch %s, state manager %s)",
            self.worker_id,
            self.settings.queue,
            self.max_size,
            self.settings.persistent_manager,
        )

    def _start_liveness(self) -> None:
        assert self.connection is not None
        self.beacon = liveness.Beacon(self.connection, self.settings.beaconttl, self.fail)
        self._background.append(asyncio.create_task(self.beacon.run()))
        if self.check_activity:
            self.activity = liveness.ActivityCheck(
                self.worker_id,
                self.settings.noop_after,
                self.settings.kill_after,
                busy=lambda: bool(self._handlers),
                publish=self._publish_probe,
                on_failure=self.fail,
            )
            self._background.append(asyncio.create_task(self.activity.run()))

    def fail(self, exit_code: int, reason: str) -> None:
        """A liveness check failed: record why; `g amqp-worker` exits with `exit_code`."""
        if self.exit_code is None:
            logger.error("Worker %s is not live: %s; exiting with %s", self.worker_id, reason, exit_code)
            self.exit_code = exit_code
        self.failed.set()

    async def _publish_probe(self, body: bytes) -> None:
        assert self.publisher is not None
        headers = {liveness.PROBE_HEADER: "1"}
        await self.publisher.publish(body, self.settings.queue, retries=0, headers=headers)

    async def _consume(self) -> None:
        assert self.connection is not None
        self._channel = await self.connection.channel()
        await self._channel.basic_qos(prefetch_count=self.max_size)
        self.publisher = Publisher(self.settings, self.connection)
        self._consumer_cancelled = asyncio.Event()
        self._channel.add_cancellation_callback(self._on_consumer_cancelled)
        result = await self._channel.basic_consume(self._on_message, queue_name=self.settings.queue)
        self._consumer_tag = result["consumer_tag"]

    async def _on_consumer_cancelled(self, channel: Channel, consumer_tag: str) -> None:
        # the broker cancels a consumer whose queue was deleted; the channel stays open
        if channel is self._channel and consumer_tag == self._consumer_tag:
            self._consumer_cancelled.set()

    async def join(self) -> None:
        """Wait until no task runs or waits on this worker."""
        assert self._idle is not None, "worker not started"
        while self._handlers:
            await self._idle.wait()

    def cancel_running(self) -> None:
        """Cancel the running tasks only; their messages stay unacked for redelivery."""
        for _, task in list(self._running.values()):
            task.cancel()

    def cancel(self) -> None:
        """Cancel every running task (their messages stay unacked) and background loop."""
        self.cancel_running()
        for task in [*self._handlers, *self._background]:
            task.cancel()

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
        self.cancel()
        await asyncio.gather(*self._handlers, *self._background, return_exceptions=True)
        self._background.clear()
        await self.presence.retire()
        if self.connection is not None:
            await self.connection.close()

    async def _stop_consuming(self) -> None:
        if self._channel is not None and self._consumer_tag and self._channel.is_open:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._channel.basic_cancel(self._consumer_tag)

    # -- one delivery ---------------------------------------------------------
    async def _on_message(self, channel: Channel, body: bytes, envelope: Any, properties: Any) -> None:
        # called from aioamqp's frame reader: hand the delivery over, never await the broker here
        if self.activity is not None:
            self.activity.touch()
        task = asyncio.create_task(self._handle(Delivery(channel, body, envelope, properties)))
        self._handlers.add(task)
        assert self._idle is not None
        self._idle.clear()
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task) -> None:
        self._handlers.discard(task)
        if not self._handlers and self._idle is not None:
            self._idle.set()

    async def _handle(self, delivery: Delivery) -> None:
        if liveness.is_probe(delivery.headers):
            await self._handle_probe(delivery)
            return
        try:
            data = messages.decode(delivery.body, delivery.headers, self.settings)
            job = Job(data, self.settings, self.state_manager)
        except InvalidMessage as exc:
            await self._refuse(delivery, exc)
            return
        assert self._slots is not None
        async with self._slots:
            try:
                await self._claim_and_run(delivery, job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # infrastructure trouble (state manager down...): keep the message, try later
                logger.exception(
                    "%s: could not be handled; sending it to the delay queue",
                    job.label,
                )
                await self._delay(delivery, job.label)

    async def _handle_probe(self, delivery: Delivery) -> None:
        """A no-op probe of the activity check: ours comes back, another worker's goes on.

        Probes are verified like tasks: an unsigned one could otherwise make every worker
        re-publish (and sign) whatever a stranger put in the queue.
        """
        try:
            messages.verify(delivery.body, delivery.headers, self.settings)
            if await liveness.handle_probe(delivery.body, self.worker_id, self.activity, self._publish_probe):
                self.probes_forwarded += 1
        except InvalidMessage as exc:
            await self._refuse(delivery, exc)
            return
        except Exception as exc:
            logger.debug("Worker %s could not forward a no-op probe: %r", self.worker_id, exc)
        await self._ack(delivery, "No-op probe")

    async def _claim_and_run(self, delivery: Delivery, job: Job) -> None:
        claim = await self.state_manager.claim(job.task_id, job.data, self.settings.lock_ttl, self.worker_id)
        if claim.outcome == LOCKED:
            # maybe a dead worker's lock: never drop the task, try again after the delay
            logger.info("%s is locked by another worker; delaying it", job.label)
            await self._delay(delivery, job.label)
            return
        if claim.outcome != CLAIMED:
            logger.info("%s is %s; skipping it", job.label, claim.outcome)
            await self._ack(delivery, job.label)
            return
        job.retries = claim.job_retries
        outcome = await self._run(job, claim.eventlog)
        await self._settle(delivery, job, outcome)

    async def _run(self, job: Job, eventlog: list) -> Outcome:
        task = asyncio.create_task(job.run(eventlog))
        self._running[job.task_id] = (job, task)
        metrics.set_running(len(self._running))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the worker is stopping: let the job see its own cancellation first
            task.cancel()
            return await task
        finally:
            self._running.pop(job.task_id, None)
            metrics.set_running(len(self._running))

    # -- the one place that decides what happens to a message ----------------
    async def _settle(self, delivery: Delivery, job: Job, outcome: Outcome) -> None:
        if outcome is Outcome.INTERRUPTED:
            # not acked: the broker redelivers it; free the lock so another worker can claim it
            await self._record(job, {"status": TaskStatus.SCHEDULED})
            logger.warning("%s interrupted; left for redelivery", job.label)
            return
        self.total_run += 1
        metrics.observe(job.dotted_name, outcome.value, job.data.get("container_id"), job.duration)
        if outcome is Outcome.FINISHED:
            await self._record(job, {"status": TaskStatus.FINISHED, "result": job.result})
            await self._ack(delivery, job.label)
        elif outcome is Outcome.CANCELED:
            await self._record(job, {"status": TaskStatus.CANCELED})
            await self.state_manager.clean_canceled(job.task_id)
            await self._ack(delivery, job.label)
        else:
            self.total_errored += 1
            await self._settle_error(delivery, job)

    async def _settle_error(self, delivery: Delivery, job: Job) -> None:
        failed = {"status": TaskStatus.ERRORED, "error": job.error}
        if self.max_task_retries is not None and job.retries >= self.max_task_retries:
            await self._record(job, {**failed, "job_retries": job.retries})
            logger.error(
                "%s failed %s times; sending it to the error queue",
                job.label,
                job.retries + 1,
            )
            await self._nack(delivery, job.label)
            return
        await self._record(job, {**failed, "job_retries": job.retries + 1})
        await self._delay(delivery, job.label)

    async def _record(self, job: Job, data: dict) -> None:
        data["updated"] = time.time()
        await self.state_manager.finish(job.task_id, data, self.settings.state_ttl, self.worker_id)

    async def _refuse(self, delivery: Delivery, exc: InvalidMessage) -> None:
        """A poison message: error queue, one log line, and the reason in its state if it has one."""
        task_id = exc.task_id or messages.trusted_task_id(delivery.body, delivery.headers, self.settings)
        logger.error(
            "Task %s refused: %s; sending it to the error queue", task_id or "(no task id)", exc.reason
        )
        if task_id:
            with contextlib.suppress(Exception):
                await self.state_manager.finish(
                    task_id,
                    {"status": TaskStatus.ERRORED, "error": f"refused: {exc.reason}"},
                    self.settings.state_ttl,
                    self.worker_id,
                )
        await self._nack(delivery, f"Task {task_id or '(no task id)'}")

    async def _delay(self, delivery: Delivery, label: str) -> None:
        """Republish to the delay queue (confirmed) and only then ack the original."""
        assert self.publisher is not None
        if not delivery.channel.is_open:
            # the broker already requeued the original: a delayed copy would make it run twice
            logger.warning("%s: its channel closed; the broker will redeliver it", label)
            return
        try:
            await self.publisher.publish(
                delivery.body, names.delay_queue(self.settings.queue), retries=1, headers=delivery.headers
            )
        except Exception:
            # unacked on a live channel it would sit there until we disconnect: hand it back
            # to the main queue instead (after a pause, not to spin while the broker struggles)
            logger.exception("%s: could not publish to the delay queue; requeueing it", label)
            await asyncio.sleep(REQUEUE_PAUSE)
            await self._nack(delivery, label, requeue=True)
            return
        await self._ack(delivery, label)

    async def _ack(self, delivery: Delivery, label: str) -> None:
        try:
            await delivery.channel.basic_client_ack(delivery.envelope.delivery_tag)
        except CONNECTION_ERRORS:
            logger.warning("%s: ack lost with the channel; the broker will redeliver it", label)

    async def _nack(self, delivery: Delivery, label: str, requeue: bool = False) -> None:
        """Without requeue the main queue dead-letters the message into the error queue."""
        try:
            await delivery.channel.basic_client_nack(delivery.envelope.delivery_tag, requeue=requeue)
        except CONNECTION_ERRORS:
            logger.warning("%s: nack lost with the channel; the broker will redeliver it", label)

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

    async def _reconnect_loop(self) -> None:
        """Consume again whenever the broker drops our connection, our channel or our consumer.

        A channel can close while its connection stays open (a failed ack, RabbitMQ's
        consumer_timeout on a long task) and a consumer can be cancelled alone (its queue
        was deleted): watching only the connection would leave the worker silently idle.
        """
        while not self._stopping:
            lost = await self._wait_for_loss()
            if self._stopping:
                return
            logger.warning("Worker %s lost its RabbitMQ %s; consuming again", self.worker_id, lost)
            await self._resume()
            logger.info("Worker %s reconnected and consuming %s", self.worker_id, self.settings.queue)

    async def _wait_for_loss(self) -> str:
        """Wait until the connection, the channel or the consumer is gone; say which."""
        assert self.connection is not None and self.connection.protocol is not None
        assert self._channel is not None
        waits = [
            asyncio.ensure_future(self.connection.protocol.connection_closed.wait()),
            asyncio.ensure_future(self._channel.close_event.wait()),
            asyncio.ensure_future(self._consumer_cancelled.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        # a closing connection closes its channels first: judge by the connection
        if not self.connection.is_open:
            return "connection"
        return "channel" if not self._channel.is_open else "consumer"

    async def _resume(self) -> None:
        """Reconnect if needed, declare the queues again (they may be gone) and consume."""
        assert self.connection is not None
        pause = 1.0
        while not self._stopping:
            try:
                if not self.connection.is_open:
                    await self.connection.close()
                    await self.connection.open()  # declares the topology
                else:
                    await self.connection.declare_topology()
                # the old channel keeps the deliveries still running; they settle on it
                await self._consume()
                return
            except CONNECTION_ERRORS as exc:
                logger.warning("Worker %s could not consume again (%r); retrying", self.worker_id, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30)
