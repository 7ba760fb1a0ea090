"""Scheduling and cancelling tasks (docs/design.md#public-api): add_task, add_object_task, cancel_task.

Also the helpers the original plugin's users import from here: get_task_id_prefix,
generate_task_id, serialize_request, make_request, metric_measure.
"""

import inspect
import logging
import uuid
from datetime import datetime
from typing import Any, AsyncIterator, Callable

from guillotina import task_vars
from guillotina.interfaces import IRequest
from guillotina.request import Request
from guillotina.utils import get_authenticated_user, get_content_path, navigate_to

from guillotina_amqp import (
    context,
    control,
    eager,
    events,
    expiry,
    metrics,
    offload,
    registry,
    replay,
    runs,
    settings,
    timing,
    tracing,
)
from guillotina_amqp import message as messages
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
    _timeout: float | None = None,
    _max_retries: int | None = None,
    _countdown: float | None = None,
    _eta: datetime | float | None = None,
    _queue: str | None = None,
    _priority: int | None = None,
    _expires: float | datetime | None = None,
    _run_in: str | None = None,
    **kwargs: Any,
) -> TaskState | None:
    """Schedule `func(*args, **kwargs)` on a worker and return its TaskState.

    The call is published persistently and the task is recorded `scheduled`
    once RabbitMQ confirmed it. It runs as the current user, inside the
    current container (if any). `_retries`: how many times publishing is tried
    again over a new connection; `_task_id`: use this id instead of a new one
    (an id whose earlier run ended runs again, as a new run); `_timeout`: seconds
    the task may run before it is cancelled and counted as failed (TaskTimeout);
    `_max_retries`: how often a failed run is retried (both override the task's
    decorator and the settings); `_countdown` (seconds) or `_eta` (a datetime, naive
    = UTC, or an epoch second): the task does not start before then (it waits in the
    broker; state `scheduled` with `eta`; a past `_eta` runs now); `_queue`: publish
    to this named queue (its own `-delay` and `-error` queues are declared with it),
    run by workers started with `--queue <name>`; None or "default" is amqp.queue;
    `_priority` (0 lowest to 9): the task waits in the queue's priority queue, where
    higher priorities start first (docs/tasks.md#priorities).
    With `amqp.eager` the task runs here and now (docs/tasks.md#eager-mode), no broker involved.
    Without an `amqp` settings block, logs a warning and returns None.

    When and where it runs (docs/tasks.md): `_expires` (seconds from now, or a datetime):
    not started by then, it never runs and ends `canceled`; `_run_in` ("thread" or
    "process", default: the task's `@task(run_in=)`): where a plain `def` runs.

    ValueError (MessageRefused, also a TypeError) when the arguments are not
    JSON or the message exceeds `amqp.max_message_bytes`; ValueError for a task
    id outside names.TASK_ID_CHARACTERS, longer than 200 or reserved, and for a
    `_timeout` that is not a positive number or a `_max_retries` below 0, for a bad
    `_countdown`/`_eta`, a negative `_expires`, an unknown `_run_in`, for a queue name
    RabbitMQ would refuse (names.task_queue), and for a `_priority` outside 0..9 or with
    quorum queues (which have no priorities). Nothing is published then.
    """
    given = {"_timeout": _timeout, "_max_retries": _max_retries, "_priority": _priority}
    options = control.check_options(given, prefix="_")
    options |= _when(func, _expires, _run_in)
    eta = timing.start_at(_countdown, _eta)
    if eta is not None:
        options["eta"] = eta
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
    queue = task_queue(_queue, config)
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


def _check_priority(config: settings.AMQPSettings, priority: int | None) -> None:
    """ValueError for a priority with quorum queues: RabbitMQ 3.x refuses x-max-priority on them."""
    if priority is not None and config.queue_type == "quorum":
        raise ValueError("_priority is not available with amqp.queue_type 'quorum' (no priority queues)")


def _when(func: Any, expires: Any, run_in: Any) -> dict[str, Any]:
    """The message fields saying when and where the task runs (only those that are set)."""
    fields = {"expires": expiry.deadline(expires), "run_in": offload.check_run_in(_unwrap(func), run_in)}
    return {name: value for name, value in fields.items() if value is not None}


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
