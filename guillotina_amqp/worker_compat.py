"""The original plugin's names on the worker, for applications and tests written against it.

`Worker` inherits them; nothing in the worker's own path depends on them.
"""

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aioamqp.channel import Channel

from guillotina_amqp import names

if TYPE_CHECKING:
    from guillotina_amqp.worker import Worker


class QueueName(str):
    """A queue's name; called with a channel, the broker's count of its messages and consumers
    (`await worker.queue_main(channel)` in the original: a passive declare)."""

    async def __call__(self, channel: Channel) -> dict[str, Any]:
        return await channel.queue_declare(queue_name=str(self), passive=True)


class ActivitySwitch:
    """`worker.check_activity`: true when the worker runs the activity check (the constructor's
    flag, `worker._check_activity`), and callable as the original's method.

    `await worker.check_activity()` is one round: a probe past `noop_after` idle seconds, the
    worker failed (exit code 4) past `kill_after`; it returns whether the worker is live.
    `check_every=`, `noop_after=`, `kill_after=` run the check as a loop with those values
    until the worker is found not live (then False), as the original's method did.
    """

    def __init__(self, worker: "Worker") -> None:
        self._worker = worker

    def __bool__(self) -> bool:
        return self._worker._check_activity

    async def __call__(
        self,
        check_every: float | None = None,
        noop_after: float | None = None,
        kill_after: float | None = None,
    ) -> bool:
        activity = self._worker.activity
        if check_every is None and noop_after is None and kill_after is None:
            return await activity.check()
        activity.configure(noop_after=noop_after, kill_after=kill_after)
        await activity.run(interval=check_every)
        return False


class OriginalWorkerNames:
    """Attributes and methods of the original plugin's Worker, kept with their meaning."""

    #: the original worker polled its queue every `sleep_interval` seconds; this one starts a
    #: delivery as it arrives and never polls: kept for code that reads it
    sleep_interval = 0.1

    @property
    def _max_running(self: "Worker") -> int:  # type: ignore[misc]
        """How many tasks run at once (our `max_size`, `amqp.max_running_tasks`)."""
        return self.max_size

    @property
    def total_run(self: "Worker") -> int:  # type: ignore[misc]
        """How many runs ended (finished, canceled or failed) on this worker."""
        return self.handler.total_run

    @property
    def total_errored(self: "Worker") -> int:  # type: ignore[misc]
        return self.handler.total_errored

    @property
    def max_task_retries(self: "Worker") -> int | None:  # type: ignore[misc]
        """The retries of a task that sets none (`amqp.max_task_retries`); settable."""
        return self.handler.max_task_retries

    @max_task_retries.setter
    def max_task_retries(self: "Worker", limit: int | None) -> None:  # type: ignore[misc]
        self.handler.max_task_retries = limit

    @property
    def queue_main(self: "Worker") -> QueueName:  # type: ignore[misc]
        return QueueName(self.settings.queue)

    @property
    def queue_delayed(self: "Worker") -> QueueName:  # type: ignore[misc]
        return QueueName(names.delay_queue(self.settings.queue))

    @property
    def queue_errored(self: "Worker") -> QueueName:  # type: ignore[misc]
        return QueueName(names.error_queue(self.settings.queue))

    async def handle_queued_job(  # type: ignore[misc]
        self: "Worker", channel: Channel, body: bytes, envelope: Any, properties: Any
    ) -> None:
        """The original's consumer callback: handle one delivery, return once it is settled.

        Works on a worker never started too: what it publishes (a retry, an error queue
        copy) then goes through this process's publisher, the one add_task uses.
        """
        before = set(self._handlers)
        await self._on_message(channel, body, envelope, properties)
        await asyncio.gather(*(self._handlers - before))

    @property
    def last_activity(self: "Worker") -> float:  # type: ignore[misc]
        """time.time() of the last delivery (or of the last check that saw a task running)."""
        return time.time() - (time.monotonic() - self.activity.last_activity)

    @last_activity.setter
    def last_activity(self: "Worker", when: float) -> None:  # type: ignore[misc]
        self.activity.last_activity = time.monotonic() - (time.time() - when)

    @property
    def check_activity(self: "Worker") -> ActivitySwitch:  # type: ignore[misc]
        return ActivitySwitch(self)

    @check_activity.setter
    def check_activity(self: "Worker", enabled: bool) -> None:  # type: ignore[misc]
        self._check_activity = enabled
