"""Interfaces of guillotina_amqp (docs/design.md#public-api, #state-in-redis)."""

from enum import StrEnum

from zope.interface import Attribute, Interface


class MessageType(StrEnum):
    """What an async-generator task yields: `(MessageType.X, value)`.

    Plain strings everywhere, `str()` and f-strings included (a `(str, Enum)` turns into
    "MessageType.RESULT" under `str()` since Python 3.11): `MessageType.RESULT == "result"`.
    """

    RESULT = "result"
    DEBUG = "debug"


class ITaskDefinition(Interface):
    """A function wrapped by `@task` / `@object_task`: calling it schedules it."""

    func = Attribute("the wrapped function")

    async def __call__(*args, **kwargs):
        """Schedule the task; return its TaskState."""

    async def schedule(*args, **kwargs):
        """Same as calling the definition."""

    def after_request(*args, _request=None, _name=None, **kwargs):
        """Schedule once the current request finishes; return the future's name."""

    def after_commit(*args, **kwargs):
        """Schedule after the current transaction commits."""

    def before_commit(*args, **kwargs):
        """Schedule just before the current transaction commits."""


class IStateManagerUtility(Interface):
    """Where task state, locks and cancellations live. Every method is a coroutine."""

    worker_id = Attribute("id written into the locks this process holds")

    async def update(task_id, data, ttl=None):
        """Merge `data` into the task's state; expire it after `ttl` seconds if given."""

    async def get(task_id):
        """The task's state dict ({} when unknown)."""

    async def exists(task_id):
        """Whether any state is stored for the task."""

    async def list(prefix=""):
        """Async-iterate the task ids (only tasks; optionally those starting with `prefix`)."""

    async def acquire(task_id, ttl):
        """Take the task's lock for `ttl` seconds; raise TaskAlreadyAcquired if held."""

    async def is_locked(task_id):
        """Whether anyone holds the task's lock."""

    async def is_mine(task_id):
        """Whether this worker holds the task's lock."""

    async def release(task_id):
        """Drop our lock; raise TaskAccessUnauthorized if another worker holds it."""

    async def refresh_lock(task_id, ttl):
        """Extend our lock; raise TaskAccessUnauthorized if another worker holds it."""

    async def cancel(task_id):
        """Put the task in the cancel set; return True."""

    async def cancelation_list():  # type: ignore[misc]  # zope interface methods take no self
        """Async-iterate the ids in the cancel set."""

    async def clean_canceled(task_id):
        """Remove the task from the cancel set; return whether it was there."""

    async def is_canceled(task_id):
        """Whether the task is in the cancel set."""


class ITaskEvent(Interface):
    """Something happened to a task (docs/tasks.md#events); subscribe: `configure.subscriber(for_=...)`."""

    task_id = Attribute("the task's id")
    dotted_name = Attribute("the task's function, as logs and metrics name it")


class ITaskScheduledEvent(ITaskEvent):
    """`add_task` recorded the task `scheduled` (in the scheduling process)."""


class ITaskStartedEvent(ITaskEvent):
    """A worker claimed the task and is about to run it."""


class ITaskFinishedEvent(ITaskEvent):
    """The task returned; `result` is what it returned."""

    result = Attribute("the task's result")


class ITaskErroredEvent(ITaskEvent):
    """A run of the task failed (it may still be retried: an ITaskRetriedEvent follows then)."""

    exception = Attribute("the exception the run raised (TaskTimeout past its time limit)")
    error = Attribute("the error recorded in the state (a traceback, or a reason)")


class ITaskRetriedEvent(ITaskEvent):
    """The task will run again after `delay` seconds (a failure, or `Retry`)."""

    exception = Attribute("the exception the run raised")
    error = Attribute("the error recorded in the state")
    delay = Attribute("seconds before the next run")


class ITaskCanceledEvent(ITaskEvent):
    """The task ended `canceled`: cancelled, or `Discard`ed (then `reason` says why)."""

    reason = Attribute("Discard's reason, or None")
