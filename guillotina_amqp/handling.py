"""One delivery in, one Disposition out: every decision about a task message, no broker I/O.

A `Handler` is given settings, a state manager and the worker's admission (its slots,
its --max-tasks quota and the gate that quota holds). `handle` decodes and checks the
message, claims its task, runs it and turns what happened (a refusal, a lock held
elsewhere, an expiry, the run's outcome, our own failure around it) into a
`Disposition`: ack, delay, dead-letter, requeue or leave. It records the states and
sends the events that go with it; it never acks, nacks or publishes. Whoever consumed
the message acts on the disposition in one place (`Worker._dispose`, or eager mode's
in-process dispose). Any exception while decoding, verifying or building a job
refuses the message into the error queue: nothing escapes.
"""

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any, Awaitable, Callable, NamedTuple

from aioamqp.channel import Channel

from guillotina_amqp import control, events, expiry, liveness, metrics, names, recycling, timing
from guillotina_amqp import message as messages
from guillotina_amqp.exceptions import InvalidMessage, Reject, Retry, TaskStateUnusable
from guillotina_amqp.job import Job, Outcome
from guillotina_amqp.settings import AMQPSettings
from guillotina_amqp.state.manager import CANCELED, CLAIMED, DONE, LOCKED, StateManager
from guillotina_amqp.state.status import TaskStatus

logger = logging.getLogger("guillotina_amqp")


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


class Handler:
    """Turns a delivery into a Disposition; the slots, quota and gate are its consumer's."""

    def __init__(
        self,
        settings: AMQPSettings,
        state_manager: StateManager,
        worker_id: str,
        slots: asyncio.Semaphore,
        quota: recycling.Quota,
        gate: recycling.Gate,
        probe: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.state_manager = state_manager
        self.worker_id = worker_id
        self.max_task_retries = settings.max_task_retries
        self.total_run = 0
        self.total_errored = 0
        #: the tasks running now, by task id (the consumer cancels them, refreshes their locks)
        self.running: dict[str, tuple[Job, asyncio.Task]] = {}
        self._slots = slots
        self.quota = quota
        self.gate = gate
        self._probe = probe  # takes back or forwards a verified no-op probe (none in eager mode)

    async def handle(self, delivery: Delivery) -> Disposition:
        """What should happen to `delivery`'s message, once everything it asks is done."""
        try:
            return await self._decide(delivery)
        except asyncio.CancelledError:
            raise  # stopping: the message stays unacked and is redelivered
        except Exception as exc:
            # the decode boundary: nothing a message carries gets past it unsettled
            return await self._refuse(delivery, exc)

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
        if self.quota.full:
            return Disposition(Action.REQUEUE, job.label)  # --max-tasks: give it back at once
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
            if self._probe is not None:
                await self._probe(delivery.body)
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
            logger.info("%s is locked by another worker; delaying it", job.label)
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
        self.running[job.task_id] = (job, task)
        metrics.set_running(len(self.running))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the worker is stopping: let the job see its own cancellation first
            task.cancel()
            return await task
        finally:
            self.running.pop(job.task_id, None)
            metrics.set_running(len(self.running))

    # -- what the outcome means for the message --
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
