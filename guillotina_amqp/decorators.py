"""`@task` and `@object_task`: functions that schedule themselves (docs/design.md#public-api)."""

import functools
import uuid
from typing import Any, Callable

from guillotina.exceptions import TransactionNotFound
from guillotina.transactions import get_transaction
from guillotina.utils import execute
from zope.interface import implementer

from guillotina_amqp import options as task_options
from guillotina_amqp import registry
from guillotina_amqp.interfaces import ITaskDefinition
from guillotina_amqp.state import TaskState


@implementer(ITaskDefinition)
class TaskDefinition:
    """A registered task: `await definition(...)` schedules `func(...)` and returns its TaskState.

    `options` (`timeout`, `queue`, ... : those of options.TaskOptions that @task takes,
    docs/tasks.md#options) apply to every call unless the call gives its own (`_timeout=`,
    `_queue=`); ValueError naming an unknown or bad option, checked now so it fails at import.
    """

    object_task = False

    def __init__(self, func: Callable[..., Any], retries: int = 3, **options: Any) -> None:
        self.func = func
        self.retries = retries
        if options.get("run_in") is not None and self.object_task:
            raise ValueError(f"object task {registry.dotted_name(func)}: run_in is not for object tasks")
        #: add_task's keywords every call defaults to
        self.defaults = task_options.on_task(func, options)
        functools.update_wrapper(self, func)
        registry.register(func)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {registry.dotted_name(self.func)}>"

    async def __call__(self, *args: Any, **kwargs: Any) -> TaskState | None:
        return await self.schedule(*args, **kwargs)

    async def schedule(self, *args: Any, **kwargs: Any) -> TaskState | None:
        """Schedule the task now (same as calling the definition)."""
        from guillotina_amqp.utils import add_object_task, add_task

        kwargs.setdefault("_retries", self.retries)
        for name, value in self.defaults.items():
            kwargs.setdefault(name, value)
        if self.object_task:
            return await add_object_task(self.func, *args, **kwargs)
        return await add_task(self.func, *args, **kwargs)

    def after_request(self, *args: Any, _request: Any = None, _name: str | None = None, **kwargs: Any) -> str:
        """Schedule once the current request has finished; return the future's name."""
        name = _name or uuid.uuid4().hex
        if _request is not None:
            kwargs["_request"] = _request
        execute.add_future(name, self.schedule, args=args, kwargs=kwargs)
        return name

    def after_commit(self, *args: Any, **kwargs: Any) -> None:
        """Schedule after the current transaction committed successfully."""

        async def hook(status: bool = True) -> None:
            if status:
                await self.schedule(*args, **kwargs)

        _current_transaction().add_after_commit_hook(hook)

    def before_commit(self, *args: Any, **kwargs: Any) -> None:
        """Schedule just before the current transaction commits."""

        async def hook() -> None:
            await self.schedule(*args, **kwargs)

        _current_transaction().add_before_commit_hook(hook)


class ObjectTaskDefinition(TaskDefinition):
    """A registered object task: `await definition(ob, ...)` runs `func(ob, ...)` on a worker."""

    object_task = True


def _current_transaction() -> Any:
    txn = get_transaction()
    if txn is None:
        raise TransactionNotFound("after_commit/before_commit need a transaction")
    return txn


def _decorator(kind: type[TaskDefinition]) -> Callable[..., Any]:
    def decorate(func: Callable[..., Any] | None = None, retries: int = 3, **options: Any) -> Any:
        if func is None:
            task_options.on_task(None, options)  # at decoration, even before a function is given
            return lambda f: kind(f, retries, **options)
        return kind(func, retries, **options)

    return decorate


#: `@task`, `@task(retries=5, timeout=30, max_retries=2, queue="reports")` or `task(func, retries=3)`;
#: `retries` is how often publishing is tried again, `max_retries` how often a failed run is;
#: the options are those of options.TaskOptions that @task takes (docs/tasks.md#options).
task = _decorator(TaskDefinition)
#: `@object_task`: like `task`, the first argument being the object to run on.
object_task = _decorator(ObjectTaskDefinition)
