"""Eager mode (`amqp.eager: true`, docs/tasks.md#eager-mode): add_task runs the task here and now.

The task goes through the worker's own code: the message is decoded and checked,
the Job rebuilds its context, and the worker's decisions (states, retries, the
exceptions a task steers with, events) apply unchanged. Only `_dispose` differs:
there is no broker, so a delayed or given-back message is run again in this
process once its delay is over. No RabbitMQ connection is ever opened.
"""

import asyncio
import contextvars
from types import SimpleNamespace
from typing import Any, Coroutine

from guillotina_amqp import message as messages
from guillotina_amqp.settings import AMQPSettings
from guillotina_amqp.worker import Action, Delivery, Disposition, Worker, counted, delay_seconds


class EagerWorker(Worker):
    """A worker that is handed messages by add_task instead of consuming a queue."""

    def __init__(self) -> None:
        super().__init__(check_activity=False)
        self._slots = asyncio.Semaphore(self.max_size)
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, body: bytes, headers: dict | None = None) -> None:
        """Handle one message as a worker would; return once its first run is settled.
        `headers`: the message's own (the trace context of the publish)."""
        headers = {**messages.sign_headers(body, self.settings), **(headers or {})}
        properties = SimpleNamespace(headers=headers)
        delivery = Delivery(None, body, None, properties, self.queues[0])  # type: ignore[arg-type]
        await self._spawn(self._handle(delivery))

    def _spawn(self, handling: Coroutine[Any, Any, None]) -> asyncio.Task:
        # a context of its own, as on a worker: the job's request, db and user never leak
        # into the caller's (nor the caller's transaction into the job)
        task = asyncio.get_running_loop().create_task(handling, context=contextvars.Context())
        self._handlers.add(task)
        assert self._idle is not None
        self._idle.clear()
        task.add_done_callback(self._handler_done)
        return task

    async def _dispose(self, delivery: Delivery, disposition: Disposition) -> None:
        # acked, dead-lettered or left: with no broker, nothing more happens to the message
        if disposition.action is Action.DELAY:
            seconds = delay_seconds(self.settings, disposition.delay_ms)
            headers = counted(delivery.headers, disposition.counter)
            later = delivery._replace(properties=SimpleNamespace(headers=headers))
            self._spawn(self._later(seconds, later))
        elif disposition.action is Action.REQUEUE:
            self._spawn(self._later(0, delivery))

    async def _later(self, seconds: float, delivery: Delivery) -> None:
        await asyncio.sleep(seconds)
        await self._handle(delivery)


_workers: dict[tuple[int, AMQPSettings], EagerWorker] = {}


def get_worker(settings: AMQPSettings) -> EagerWorker:
    """This event loop's eager worker for `settings`; `await get_worker(s).join()` waits
    until its delayed retries are done."""
    loop_id = id(asyncio.get_running_loop())
    worker = _workers.get((loop_id, settings))
    if worker is None:
        for stale in [key for key in _workers if key[0] != loop_id]:
            del _workers[stale]  # their loop is gone
        worker = _workers[(loop_id, settings)] = EagerWorker()
    return worker


async def run(body: bytes, settings: AMQPSettings, headers: dict | None = None) -> None:
    """Run the task message `body` in this process (eager mode)."""
    await get_worker(settings).run(body, headers)
