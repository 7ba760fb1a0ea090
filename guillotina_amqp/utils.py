"""Scheduling and cancelling tasks (docs/design.md#public-api): add_task, add_object_task, cancel_task.

Also the helpers the original plugin's users import from here: get_task_id_prefix,
generate_task_id, serialize_request, make_request, metric_measure.
"""

import inspect
import logging
import uuid
from typing import Any, AsyncIterator, Callable

from guillotina import task_vars
from guillotina.interfaces import IRequest
from guillotina.request import Request
from guillotina.utils import get_authenticated_user, get_content_path, navigate_to

from guillotina_amqp import (
    context,
    eager,
    events,
    metrics,
    registry,
    replay,
    runs,
    settings,
    timing,
    tracing,
)
from guillotina_amqp import message as messages
from guillotina_amqp import options as task_options
from guillotina_amqp.exceptions import ObjectNotFoundException, TaskNotFoundException
from guillotina_amqp.interfaces import ITaskDefinition
from guillotina_amqp.names import check_task_id, task_id_prefix, task_name, task_queue
from guillotina_amqp.publishing import publish_task
from guillotina_amqp.state import TaskState
from guillotina_amqp.state.manager import initial_state, manager_for
from guillotina_amqp.types import SerializedRequest

logger = logging.getLogger("guillotina_amqp")


def _dotted_name(func: Any) -> str:
    if ITaskDefinition.providedBy(func):
        func = func.func
    return func if isinstance(func, str) else registry.dotted_name(func)


def get_task_id_prefix() -> str:
    """What the ids of tasks scheduled here start with: `task:{db_id}-{container_id}-`
    inside a container, "" elsewhere."""
    container = task_vars.container.get()
    if container is None:
        return ""
    return task_id_prefix(getattr(task_vars.db.get(), "id", None), container.id)


def generate_task_id() -> str:
    """A new task id for a task scheduled here: get_task_id_prefix() + a uuid4."""
    return get_task_id_prefix() + str(uuid.uuid4())


def serialize_request(request: IRequest | None = None) -> SerializedRequest:
    """The message's `req_data` for `request` (default: the current one), the current user and
    container: what the worker rebuilds the task's context from. Credentials are left out."""
    request = request if request is not None else task_vars.request.get()
    return messages.request_data(request, get_authenticated_user(), task_vars.container.get())


def make_request(base_request: Any, req_data: SerializedRequest | dict) -> Request:
    """A request rebuilt from `req_data` (url, method, headers, annotations), made current.

    `base_request` is accepted for the original plugin's callers and not used: nothing
    of the worker's own request goes into a task's request.
    """
    return context.rebuild_request(dict(req_data))


#: metric_measure(metric, value, labels=None): observe a Prometheus metric if metrics are on
metric_measure = metrics.measure


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
    again over a new connection; `_task_id`: use this id instead of a new one
    (an id whose earlier run ended runs again, as a new run); `_request`: the
    request whose context it runs in (default: the current one). The per-task
    options, `_timeout=`, `_countdown=` and the others of options.TaskOptions (listed
    with what they do in docs/tasks.md#options), are taken out of `kwargs`; the call's
    override the task's decorator, which overrides the settings.
    With `amqp.eager` the task runs here and now (docs/tasks.md#eager-mode), no broker involved.
    Without an `amqp` settings block, logs a warning and returns None.

    ValueError (MessageRefused, also a TypeError) when the arguments are not
    JSON or the message exceeds `amqp.max_message_bytes`; ValueError for a task
    id outside names.TASK_ID_CHARACTERS, longer than 200 or reserved, for a bad option
    (naming it: a `_timeout` that is not a positive number, a `_max_retries` below 0,
    a bad `_countdown`/`_eta`, a negative `_expires`, an unknown `_run_in`, a queue name
    RabbitMQ would refuse, a `_priority` outside 0..9), and for a `_priority` with
    quorum queues (which have no priorities). Nothing is published then.
    """
    options = task_options.from_call(_unwrap(func), kwargs)
    eta = options.get("eta")
    dotted = _dotted_name(func)
    if not settings.is_configured():
        logger.warning("No 'amqp' settings: task %s not scheduled", dotted)
        return None
    config = settings.get_settings()  # read once: each read compares the whole block
    request = _request if _request is not None else task_vars.request.get()
    container, db = task_vars.container.get(), task_vars.db.get()
    db_id = getattr(db, "id", None) if container is not None else None
    container_id = getattr(container, "id", None)
    task_id = check_task_id(_task_id) if _task_id is not None else generate_task_id()
    queue = task_queue(options.pop("queue", None), config)
    _check_priority(config, options.get("priority"))
    manager = manager_for(config)
    # an id of our own making has no earlier run to follow: no round trip to the store
    run = runs.first_run() if _task_id is None else await manager.next_run(task_id)
    message = {
        **options,
        "func": dotted,
        "args": list(args),
        "kwargs": kwargs,
        "db_id": db_id,
        "container_id": container_id,
        "task_id": task_id,
        "run": run,
        "req_data": messages.request_data(request, get_authenticated_user(), container),
    }
    if queue != config.queue:
        message["queue"] = queue  # where it was sent: job_data tells, a replay can route it there again
    body = messages.encode(replay.stamp(message, config), config)
    dotted_name = task_name(dotted, args)
    with tracing.publish_span(task_id, dotted_name, run) as trace_headers:
        if not config.eager:
            priority = options.get("priority")
            await publish_task(body, config, queue, timing.wait_ms(eta), _retries, priority, trace_headers)
        waiting = {"eta": eta} if eta is not None else {}
        # job_data from the start: the dashboard names a waiting task's function, retry can re-run it
        await manager.create(task_id, initial_state(run) | waiting | {"job_data": message})
    await events.notify(events.TaskScheduledEvent(task_id, dotted_name))
    if config.eager:
        await eager.run(body, config, trace_headers)  # its run span a child of the publish span
    return TaskState(task_id)


#: help(add_task) lists every option's keywords (they are read from `kwargs`)
add_task.__signature__ = task_options.signature(add_task)  # type: ignore[attr-defined]


def _check_priority(config: settings.AMQPSettings, priority: int | None) -> None:
    """ValueError for a priority with quorum queues: RabbitMQ 3.x refuses x-max-priority on them."""
    if priority is not None and config.queue_type == "quorum":
        raise ValueError("_priority is not available with amqp.queue_type 'quorum' (no priority queues)")


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
