"""Scheduling and cancelling tasks (SPEC §1): add_task, add_object_task, cancel_task."""

import inspect
import logging
import uuid
from typing import Any, AsyncIterator, Callable

from guillotina import task_vars
from guillotina.interfaces import IRequest
from guillotina.utils import get_authenticated_user, get_content_path, navigate_to

from guillotina_amqp import message as messages
from guillotina_amqp import registry, settings
from guillotina_amqp.exceptions import ObjectNotFoundException, TaskNotFoundException
from guillotina_amqp.interfaces import ITaskDefinition
from guillotina_amqp.names import task_id_prefix
from guillotina_amqp.publishing import get_publisher
from guillotina_amqp.state import TaskState, get_state_manager
from guillotina_amqp.state.manager import initial_state

logger = logging.getLogger("guillotina_amqp")


def _dotted_name(func: Any) -> str:
    if ITaskDefinition.providedBy(func):
        func = func.func
    return func if isinstance(func, str) else registry.dotted_name(func)


def _new_task_id(db_id: str | None, container_id: str | None) -> str:
    if container_id:
        return task_id_prefix(db_id, container_id) + str(uuid.uuid4())
    return str(uuid.uuid4())


async def add_task(
    func: Callable[..., Any] | str,
    *args: Any,
    _request: IRequest | None = None,
    _retries: int = 3,
    _task_id: str | None = None,
    **kwargs: Any,
) -> TaskState | None:
    """Schedule `func(*args, **kwargs)` on a worker and return its TaskState.

    The call is published persistently and the task is recorded `scheduled`
    once RabbitMQ confirmed it. It runs as the current user, inside the
    current container (if any). `_retries`: how many times publishing is tried
    again over a new connection; `_task_id`: use this id instead of a new one.
    Without an `amqp` settings block, logs a warning and returns None.
    """
    if not settings.is_configured():
        logger.warning("No 'amqp' settings: task %s not scheduled", _dotted_name(func))
        return None
    config = settings.get_settings()
    request = _request if _request is not None else task_vars.request.get()
    container, db = task_vars.container.get(), task_vars.db.get()
    db_id = getattr(db, "id", None) if container is not None else None
    container_id = getattr(container, "id", None)
    task_id = _task_id or _new_task_id(db_id, container_id)
    message = {
        "func": _dotted_name(func),
        "args": list(args),
        "kwargs": kwargs,
        "db_id": db_id,
        "container_id": container_id,
        "task_id": task_id,
        "req_data": messages.request_data(request, get_authenticated_user(), container),
    }
    body = messages.encode(message)
    await get_publisher(config).publish(body, config.queue, retries=_retries)
    # job_data from the start: the dashboard names a waiting task's function, retry can re-run it
    await get_state_manager().create(task_id, {**initial_state(), "job_data": message})
    return TaskState(task_id)


async def add_object_task(
    callable: Callable[..., Any], ob: Any, *args: Any, **kwargs: Any
) -> TaskState | None:
    """Schedule `callable(ob, *args, **kwargs)`: the worker re-loads `ob` by its path.

    If the object is gone by then, the task finishes with result None. Takes
    the same `_request`, `_retries` and `_task_id` keywords as add_task.
    """
    wrapper = _yield_object_task if inspect.isasyncgenfunction(_unwrap(callable)) else _run_object_task
    return await add_task(wrapper, _dotted_name(callable), get_content_path(ob), *args, **kwargs)


def _unwrap(func: Any) -> Any:
    return func.func if ITaskDefinition.providedBy(func) else func


async def _load_object(callable_name: str, path: str) -> tuple[Callable[..., Any], Any]:
    func = registry.resolve(callable_name, settings.get_settings())
    container: Any = task_vars.container.get()
    if container is None:
        # a mistake of the scheduling code, not a deleted object: error, don't finish silently
        raise RuntimeError(f"object task on {path} was scheduled outside any container")
    try:
        ob = await navigate_to(container, path) if path.strip("/") else container
    except KeyError:
        raise ObjectNotFoundException(f"object {path} not found") from None
    return func, ob


async def _run_object_task(callable_name: str, path: str, *args: Any, **kwargs: Any) -> Any:
    func, ob = await _load_object(callable_name, path)
    return await func(ob, *args, **kwargs)


async def _yield_object_task(callable_name: str, path: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    func, ob = await _load_object(callable_name, path)
    async for item in func(ob, *args, **kwargs):
        yield item


async def cancel_task(task_id: str) -> bool:
    """Cancel the task `task_id`; False if no such task is known."""
    try:
        return await TaskState(task_id).cancel()
    except TaskNotFoundException:
        return False
