"""The worker: consume task messages, run them concurrently, settle each one once.

Every delivery is handled in its own asyncio task (aioamqp calls the consumer
from its frame reader, which must never wait on the broker). Each path through
`_handle` returns a Disposition (ack, delay, dead-letter, requeue, leave); `_dispose` is
the single place that acts on it. Any exception while decoding, verifying or
building a job refuses the message into the error queue: nothing escapes.
"""

import asyncio
import contextlib
import contextvars
import enum
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Iterable, NamedTuple

from aioamqp.channel import Channel

from guillotina_amqp import (
    control,
    events,
    expiry,
    liveness,
    metrics,
    names,
    periodic_tasks,
    recycling,
    redelivery,
    timing,
)
from guillotina_amqp import message as messages
from guillotina_amqp.cancelling import cancel_and_wait
from guillotina_amqp.connection import CONNECTION_ERRORS, AMQPConnection
from guillotina_amqp.exceptions import InvalidMessage, Reject, Retry, TaskStateUnusable
from guillotina_amqp.job import Job, Outcome
from guillotina_amqp.presence import Presence
from guillotina_amqp.publishing import Publisher, get_publisher
from guillotina_amqp.settings import AMQPSettings, get_settings
from guillotina_amqp.state.manager import CANCELED, CLAIMED, DONE, LOCKED, get_state_manager
from guillotina_amqp.state.status import TaskStatus
from guillotina_amqp.worker_compat import OriginalWorkerNames

logger = logging.getLogger("guillotina_amqp")

#: seconds a stopping worker waits for the broker to confirm each consumer's cancel
STOP_CONSUMING_TIMEOUT = 5.0
#: seconds to wait before handing back a message we could not send to the delay queue
REQUEUE_PAUSE = 1.0
#: how often our own failures (not the task's) sent the message round the delay queue
FAILURES_HEADER = "x-guillotina-amqp-failures"
#: how often it waited for another worker's lock (bounded by that lock's life)
DEFERRALS_HEADER = "x-guillotina-amqp-deferrals"


class Action(enum.Enum):
    ACK = "ack"
    DELAY = "delay"  # through the delay queue, back to the main queue later
    DEAD_LETTER = "dead-letter"  # into the error queue
    REQUEUE = "requeue"  # back to the main queue at once (a task's Reject, --max-tasks)
    LEAVE = "leave"  # unacked: the broker redelivers it when our channel closes


class Disposition(NamedTuple):
    """What should happen to a message; `counter` names the header that counts a delay,
    `delay_ms` how long it waits (None: the delay queue's own delayed_ttl_ms)."""

    action: Action
    label: str
    counter: str | None = None
    delay_ms: int | None = None


def delay_seconds(settings: AMQPSettings, delay_ms: int | None) -> float:
    """How long a DELAY disposition holds the message: its delay tier, or the delay queue's TTL."""
    return (settings.delayed_ttl_ms if delay_ms is None else names.delay_tier_ms(delay_ms)) / 1000


def counted(headers: dict | None, counter: str | None) -> dict:
    """The headers of a copy we republish: the broker's death records dropped, `counter` (if any)
    one higher."""
    forwarded = messages.forwarded_headers(headers)
    if counter is not None:
        forwarded[counter] = _count(headers, counter) + 1
    return forwarded


def _count(headers: dict | None, name: str) -> int:
    """A counter header as we wrote it; anything else (a stranger's value) counts as 0."""
    value = (headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def priority_queues(settings: AMQPSettings, queues: list[str]) -> list[str]:
    """The priority queues a worker of `queues` consumes too; none with quorum queues, which
    RabbitMQ 3.x declares with no x-max-priority (add_task refuses `_priority` then)."""
    if settings.queue_type == "quorum":
        return []
    return [names.priority_queue(queue) for queue in queues]


def message_priority(properties: Any) -> int | None:
    """The AMQP priority a message we republish keeps (a retried priority task stays one)."""
    priority = getattr(properties, "priority", None)
    return priority if isinstance(priority, int) and 0 <= priority <= names.MAX_PRIORITY else None


class Delivery(NamedTuple):
    channel: Channel
    body: bytes
    envelope: Any
    properties: Any
    queue: str  # the queue it came from: its retries go through that queue's delay queue

    @property
    def headers(self) -> dict | None:
        return getattr(self.properties, "headers", None)


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
        self.consumed = self.queues + priority_queues(self.settings, self.queues)
        self.max_size = max_size or self.settings.max_running_tasks
        self._check_activity = check_activity
        self.max_task_retries = self.settings.max_task_retries
        self.update_status_interval = self.settings.update_status_interval
        self.state_manager = get_state_manager()
        self.worker_id = f"{uuid.uuid4().hex}"
        self.total_run = 0
        self.total_errored = 0
        self.connection: AMQPConnection | None = None
        self.publisher: Publisher | None = None
        self._channel: Channel | None = None
        self._consumer_tags: set[str] = set()
        self._running: dict[str, tuple[Job, asyncio.Task]] = {}
        self._handlers: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._slots = asyncio.Semaphore(self.max_size)
        # copies redelivered while we run them (consumer_timeout): kept aside, no slot
        self.redelivered = redelivery.Redeliveries(Disposition(Action.LEAVE, "a copy"))
        self._prefetch = self.max_size
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
            # a channel-wide limit counts the runs still going on a closed channel (they keep
            # their slots); a consumer's own cannot be raised again as they end: all slots, then
            shared = self._shared_qos
            self._prefetch = self.max_size
            if shared:
                self._prefetch = self.redelivered.prefetch(self.max_size, self._channel)
            await self._channel.basic_qos(prefetch_count=self._prefetch, connection_global=shared)
            self._channel.add_cancellation_callback(self._on_consumer_cancelled)
        self._consumer_cancelled = asyncio.Event()
        self._consumer_tags = set()
        for queue in self.consumed:
            result = await self._channel.basic_consume(self._consumer(queue), queue_name=queue)
            self._consumer_tags.add(result["consumer_tag"])
        return {"channel": self._channel.close_event, "consumer": self._consumer_cancelled}

    @property
    def _shared_qos(self) -> bool:
        # a limit per channel (global) across several queues: RabbitMQ then offers each freed
        # slot to the blocked queues in random order; per consumer, the acked queue always won
        return len(self.consumed) > 1

    async def _reprefetch(self) -> None:
        """Raise or lower the consuming channel's prefetch to what the slots allow now; only a
        channel-wide limit changes in place (a consumer's own is fixed when it starts)."""
        channel = self._channel
        if channel is None or not channel.is_open or not self._shared_qos:
            return
        prefetch = self.redelivered.prefetch(self.max_size, channel)
        if prefetch != self._prefetch:
            self._prefetch = prefetch
            await channel.basic_qos(prefetch_count=prefetch, connection_global=True)

    def _consumer(self, queue: str) -> Callable[..., Awaitable[None]]:
        async def on_message(channel: Channel, body: bytes, envelope: Any, properties: Any) -> None:
            await self._on_message(channel, body, envelope, properties, queue)

        return on_message

    async def _gate_loop(self, consuming: bool) -> None:
        """Consume while the gate is open; stop consuming (what we hold unclaimed goes back) while held."""
        while True:
            await self.gate.changed.wait()
            self.gate.changed.clear()
            if self.gate.open == consuming or self._stopping:
                continue
            consuming = self.gate.open
            try:
                if consuming:
                    assert self.connection is not None
                    await self.connection.keep(self._consume)
                else:
                    await self._stop_consuming()
            except Exception:
                logger.exception(
                    "Worker %s: could not %s consuming", self.worker_id, "resume" if consuming else "stop"
                )
                consuming = not consuming
                await asyncio.sleep(REQUEUE_PAUSE)
                self.gate.changed.set()

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
        try:
            disposition = await self._decide(delivery)
        except asyncio.CancelledError:
            raise  # stopping: the message stays unacked and is redelivered
        except Exception as exc:
            # the decode boundary: nothing a message carries gets past it unsettled
            disposition = await self._refuse(delivery, exc)
        await self._dispose(delivery, disposition)

    async def _decide(self, delivery: Delivery) -> Disposition:
        if liveness.is_probe(delivery.headers):
            return await self._handle_probe(delivery)
        data = messages.decode(delivery.body, delivery.headers, self.settings)
        job = Job(data, self.settings, self.state_manager, headers=delivery.headers)
        wait = timing.wait_ms(data.get("eta"))
        if wait is not None:
            # not its time yet: back into a delay tier, uncounted, without taking a slot
            return Disposition(Action.DELAY, job.label, delay_ms=wait)
        await timing.until(data.get("eta"))
        key = (job.task_id, job.run_id)
        if self.redelivered.running(key):  # redelivered while we run it: no slot, settled with the run
            return await self.redelivered.hold(key, job.label, delivery, Disposition(Action.ACK, job.label))
        if self.quota.full:
            return Disposition(Action.REQUEUE, job.label)  # --max-tasks: give it back at once
        return await self.redelivered.run(key, delivery, self._in_slot(delivery, job))

    async def _in_slot(self, delivery: Delivery, job: Job) -> Disposition:
        async with self._slots:
            try:
                return await self._claim_within_quota(job)
            except asyncio.CancelledError:
                raise
            except TaskStateUnusable as exc:
                return await self._refuse(delivery, exc, record=False)
            except InvalidMessage as exc:  # its function, checked once claimed
                return await self._refuse(delivery, exc)
            except Exception as exc:
                return await self._infrastructure_failure(delivery, job, exc)

    async def _handle_probe(self, delivery: Delivery) -> Disposition:
        """A no-op probe of the activity check: ours comes back, another worker's goes on.

        Probes are verified like tasks: an unsigned one could otherwise make every worker
        re-publish (and sign) whatever a stranger put in the queue. A probe never touches
        any task's state, whatever its body says.
        """
        try:
            messages.verify(delivery.body, delivery.headers, self.settings)
            if await liveness.handle_probe(delivery.body, self.worker_id, self.activity, self._publish_probe):
                self.probes_forwarded += 1
        except InvalidMessage as exc:
            return await self._refuse(delivery, exc, record=False)
        except Exception as exc:
            logger.debug("Worker %s could not forward a no-op probe: %r", self.worker_id, exc)
        return Disposition(Action.ACK, "No-op probe")

    async def _claim_within_quota(self, job: Job) -> Disposition:
        """--max-tasks: claim only while a place is left; consume no more once none is."""
        if not self.quota.take():
            return Disposition(Action.REQUEUE, job.label)
        self.gate.hold(recycling.MAX_TASKS, self.quota.full)
        try:
            return await self._claim_and_run(job)
        finally:
            self.quota.settle(claimed=job.started is not None)
            self.gate.hold(recycling.MAX_TASKS, self.quota.full)

    async def _claim_and_run(self, job: Job) -> Disposition:
        claim = await self.state_manager.claim(job.task_id, job.data, self.settings.lock_ttl, self.worker_id)
        if claim.outcome == LOCKED:
            # maybe a dead worker's lock: never drop the task, try again after the delay
            holder = redelivery.lock_holder(ours=job.task_id in self._running)
            logger.info("%s is locked by %s; delaying it", job.label, holder)
            return Disposition(Action.DELAY, job.label, counter=DEFERRALS_HEADER)
        if claim.outcome == DONE and claim.status == TaskStatus.ERRORED:
            logger.info("%s already failed for good; sending it to the error queue", job.label)
            return Disposition(Action.DEAD_LETTER, job.label)
        if claim.outcome != CLAIMED:
            logger.info("%s is %s; skipping it", job.label, claim.outcome)
            if claim.outcome == CANCELED:
                await self._notify(events.TaskCanceledEvent, job)
            return Disposition(Action.ACK, job.label)
        job.retries = claim.job_retries
        if claim.crashes and self._exhausted(claim.crashes - 1, job.max_retries):
            return await self._died_too_often(job, claim.crashes)
        job.resolve()  # a function that may not run: refused, and the claimed run ends errored
        too_late = expiry.expired(job.data)
        if too_late:
            return await self._expire(job, too_late)
        await self._notify(events.TaskStartedEvent, job)
        return await self._settle(job, await self._run(job))

    async def _died_too_often(self, job: Job, crashes: int) -> Disposition:
        """Its worker died under it more often than it may be retried: the task itself may be what
        kills them (memory, a native crash, os._exit), so it is not run again."""
        reason = f"its worker died while running it {crashes} times; it may be what kills them"
        logger.error("%s: %s; sending it to the error queue", job.label, reason)
        await self._record(job, {"status": TaskStatus.ERRORED, "error": reason}, final=True)
        await self._notify(events.TaskErroredEvent, job, exception=None, error=reason)
        return Disposition(Action.DEAD_LETTER, job.label)

    async def _expire(self, job: Job, reason: str) -> Disposition:
        """Past its `_expires` deadline before it could start: never run, canceled."""
        logger.info("%s %s; canceling it", job.label, reason)
        await self._record(job, {"status": TaskStatus.CANCELED, "error": reason}, final=True)
        await self._notify(events.TaskCanceledEvent, job, reason=reason)
        return Disposition(Action.ACK, job.label)

    async def _run(self, job: Job) -> Outcome:
        task = asyncio.create_task(job.run())
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

    # -- what happens to a message: decided by the paths above, done by _dispose alone --
    async def _settle(self, job: Job, outcome: Outcome) -> Disposition:
        if outcome is Outcome.INTERRUPTED:
            # not acked: the broker redelivers it; free the lock so another worker can claim it
            await self._record(job, {"status": TaskStatus.SCHEDULED})
            logger.warning("%s interrupted; left for redelivery", job.label)
            return Disposition(Action.LEAVE, job.label)
        if outcome is Outcome.REJECTED:
            return await self._give_back(job)
        self.total_run += 1
        metrics.observe(job.dotted_name, outcome.value, job.data.get("container_id"), job.duration)
        if outcome is Outcome.FINISHED:
            await self._record(job, {"status": TaskStatus.FINISHED, "result": job.result}, final=True)
            await self._notify(events.TaskFinishedEvent, job, result=job.result)
            return Disposition(Action.ACK, job.label)
        if outcome in (Outcome.CANCELED, Outcome.DISCARDED):
            canceled: dict[str, Any] = {"status": TaskStatus.CANCELED}
            reason = job.error if outcome is Outcome.DISCARDED else None
            if reason is not None:
                canceled["error"] = reason
            await self._record(job, canceled, final=True)
            await self.state_manager.clean_canceled(job.task_id)
            await self._notify(events.TaskCanceledEvent, job, reason=reason)
            return Disposition(Action.ACK, job.label)
        self.total_errored += 1
        return await self._failed(job, outcome)

    async def _failed(self, job: Job, outcome: Outcome) -> Disposition:
        """A failed run (or a task's Retry): delayed for its next run, or errored for good."""
        failed = {"status": TaskStatus.ERRORED, "error": job.error}
        what = {"exception": job.exception, "error": job.error}
        if outcome is Outcome.FAILED or self._exhausted(job.retries, job.max_retries):
            await self._record(job, {**failed, "job_retries": job.retries}, final=True)
            await self._notify(events.TaskErroredEvent, job, **what)
            why = "failed for good" if outcome is Outcome.FAILED else f"failed {job.retries + 1} times"
            logger.error("%s %s; sending it to the error queue", job.label, why)
            return Disposition(Action.DEAD_LETTER, job.label)
        requested = job.exception.delay if isinstance(job.exception, Retry) else None
        delay_ms = control.retry_delay_ms(self.settings, job.retries, requested)
        await self._record(job, {**failed, "job_retries": job.retries + 1})
        if outcome is Outcome.ERRORED:
            await self._notify(events.TaskErroredEvent, job, **what)
        delay = delay_seconds(self.settings, delay_ms)
        await self._notify(events.TaskRetriedEvent, job, delay=delay, **what)
        return Disposition(Action.DELAY, job.label, delay_ms=delay_ms)

    async def _give_back(self, job: Job) -> Disposition:
        """A task's Reject: not a failure, not counted; scheduled again for any worker."""
        await self._record(job, {"status": TaskStatus.SCHEDULED})
        delay = job.exception.delay if isinstance(job.exception, Reject) else None
        if delay is None:
            return Disposition(Action.REQUEUE, job.label)
        return Disposition(Action.DELAY, job.label, delay_ms=round(delay * 1000))

    async def _notify(self, kind: type[events.TaskEvent], job: Job, **details: Any) -> None:
        await events.notify(kind(job.task_id, job.dotted_name, **details))

    def _exhausted(self, retries: int, limit: int | None = None) -> bool:
        """Whether `retries` reached `limit` (the task's own), else the worker's max_task_retries."""
        limit = self.max_task_retries if limit is None else limit
        return limit is not None and retries >= limit

    async def _record(self, job: Job, data: dict, final: bool = False) -> None:
        """Write the run's outcome; an ended run's state expires state_ttl later, a live one never."""
        data["updated"] = time.time()
        if final:
            data["ended"] = data["updated"]
        ttl = self.settings.state_ttl if final else None
        if not await self.state_manager.finish(job.task_id, data, ttl, self.worker_id, run=job.run_id):
            logger.info("%s: a later run of the same id owns the state now; left untouched", job.label)

    async def _infrastructure_failure(self, delivery: Delivery, job: Job, exc: Exception) -> Disposition:
        """Our own trouble around a task (Redis down, a state write refused): retried, counted.

        The count travels in a header (the state store may be what failed) and is
        bounded by max_task_retries like the task's own failures.
        """
        failures = _count(delivery.headers, FAILURES_HEADER) + 1
        if not self._exhausted(failures - 1):
            logger.error("%s could not be handled (%r); retrying it later", job.label, exc, exc_info=exc)
            return Disposition(Action.DELAY, job.label, counter=FAILURES_HEADER)
        reason = f"gave up after {failures} failures of the worker's own: {exc!r}"
        logger.error("%s: %s; sending it to the error queue", job.label, reason)
        with contextlib.suppress(Exception):
            await self._record(job, {"status": TaskStatus.ERRORED, "error": reason}, final=True)
        return Disposition(Action.DEAD_LETTER, job.label)

    async def _refuse(self, delivery: Delivery, exc: Exception, record: bool = True) -> Disposition:
        """A poison message: error queue, one log line, and the reason in its own state if it has one.

        Only an authentic message names its task (trusted_identity), and only a run that has
        not ended gets the refusal written: a replayed or forged message spoils no one's state.
        """
        reason = exc.reason if isinstance(exc, InvalidMessage) else f"{type(exc).__name__}: {exc}"
        identity = None
        if record:
            identity = messages.trusted_identity(delivery.body, delivery.headers, self.settings)
        label = f"Task {identity[0] if identity else '(no task id)'}"
        logger.error("%s refused: %s; sending it to the error queue", label, reason)
        if identity is not None:
            task_id, run = identity
            now = time.time()
            refused: dict[str, Any] = {"status": TaskStatus.ERRORED, "error": f"refused: {reason}"}
            refused |= {"run": run, "updated": now, "ended": now}
            try:
                await self.state_manager.finish(
                    task_id, refused, self.settings.state_ttl, self.worker_id, run=run, only_open=True
                )
            except Exception:
                logger.exception("%s: could not record the refusal in its state", label)
        return Disposition(Action.DEAD_LETTER, label)

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
