"""Task events (docs/tasks.md#events), told to the subscribers registered in Guillotina's component registry.

Subscribe the Guillotina way::

    @configure.subscriber(for_=ITaskFinishedEvent)
    async def finished(event): ...

A subscriber that raises is logged and skipped: it never fails, re-runs or holds up
the task's outcome, and the other subscribers are still told.
"""

import inspect
import logging
from typing import Any

from guillotina.component import get_component_registry
from zope.interface import implementer, providedBy

from guillotina_amqp.interfaces import (
    ITaskCanceledEvent,
    ITaskErroredEvent,
    ITaskEvent,
    ITaskFinishedEvent,
    ITaskRetriedEvent,
    ITaskScheduledEvent,
    ITaskStartedEvent,
)

logger = logging.getLogger("guillotina_amqp")


@implementer(ITaskEvent)
class TaskEvent:
    def __init__(self, task_id: str, dotted_name: str, **details: Any) -> None:
        self.task_id = task_id
        self.dotted_name = dotted_name
        self.__dict__.update(details)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.task_id} ({self.dotted_name})>"


@implementer(ITaskScheduledEvent)
class TaskScheduledEvent(TaskEvent):
    pass


@implementer(ITaskStartedEvent)
class TaskStartedEvent(TaskEvent):
    pass


@implementer(ITaskFinishedEvent)
class TaskFinishedEvent(TaskEvent):
    result: Any = None


@implementer(ITaskErroredEvent)
class TaskErroredEvent(TaskEvent):
    exception: BaseException | None = None
    error: str | None = None


@implementer(ITaskRetriedEvent)
class TaskRetriedEvent(TaskEvent):
    exception: BaseException | None = None
    error: str | None = None
    delay: float = 0.0


@implementer(ITaskCanceledEvent)
class TaskCanceledEvent(TaskEvent):
    reason: str | None = None


async def notify(event: TaskEvent) -> None:
    """Tell `event` to its subscribers in priority order, as guillotina.event.notify does,
    but one at a time: a failing subscriber is logged and the next one still runs."""
    try:
        registry: Any = get_component_registry()
        handlers = registry.adapters.subscriptions([providedBy(event)], None)
    except Exception:  # no component registry (not a Guillotina process): nobody to tell
        logger.exception("Task %s: cannot look up the subscribers of %s", event.task_id, type(event).__name__)
        return
    for handler in sorted(handlers, key=lambda h: getattr(h, "priority", 100)):
        try:
            result = handler(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "Task %s: a subscriber of %s failed; ignored", event.task_id, type(event).__name__
            )
