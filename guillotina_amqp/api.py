"""REST services on containers: list, read, cancel and retry tasks; workers, queues (docs/operations.md)."""

from typing import Any, Callable, TypeVar

import orjson
from guillotina import configure, task_vars
from guillotina.api.service import Service
from guillotina.component import get_utility
from guillotina.interfaces import IApplication, IContainer, IDatabase
from guillotina.response import HTTPBadRequest, HTTPConflict, HTTPNotFound
from guillotina.utils import get_authenticated_user, get_security_policy

from guillotina_amqp import queues, task_index
from guillotina_amqp.message import public_headers
from guillotina_amqp.names import in_container, task_id_prefix
from guillotina_amqp.retry import RetryRefused, retry_task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager

NOT_FOUND = {"reason": "Task not found"}
Handler = TypeVar("Handler", bound=Callable[..., Any])


def _service(method: str, name: str, alias: str, summary: str) -> Callable[[Handler], Handler]:
    """Register a service on containers under its name and the original plugin's old name."""

    def register(handler: Handler) -> Handler:
        deprecated = f"Deprecated alias of {method} {name}"
        for service_name, text in ((name, summary), (alias, deprecated)):
            container_service(method, service_name, text)(handler)
        return handler

    return register


def container_service(method: str, name: str, summary: str, **extra: Any) -> Callable[[Handler], Handler]:
    """Register a service on containers, with guillotina.ManageAMQP unless `extra` says otherwise."""
    return configure.service(
        context=IContainer,
        method=method,
        name=name,
        **{"permission": "guillotina.ManageAMQP", **extra},
        summary=summary,
    )


def _container_prefix(context: Any) -> str:
    db = task_vars.db.get()
    return task_id_prefix(getattr(db, "id", None), context.id)


def _lookalike_prefix(prefix: str) -> bool:
    """Whether another database's container can make ids with our very prefix.

    "task:{db}-{container}-" is ambiguous when ids contain dashes: db "db" with
    container "a-x" and db "db-a" with container "x" both give "task:db-a-x-".
    """
    own = getattr(task_vars.db.get(), "id", None)
    root = get_utility(IApplication, name="root")
    # iterating the root gives (id, object) pairs; databases from `storages` appear once opened
    others = [key for key, db in root if IDatabase.providedBy(db) and key != own]
    return any(prefix.startswith(f"task:{other}-") for other in others)


async def _owned(task_id: str, context: Any) -> bool:
    """Ownership told by the state itself (the stored message), for ambiguous prefixes."""
    return _owns(await get_state_manager().get(task_id), context)


def _owns(state: dict, context: Any) -> bool:
    job_data = state.get("job_data") or state
    db = task_vars.db.get()
    return job_data.get("db_id") == getattr(db, "id", None) and job_data.get("container_id") == context.id


def visible(task_id: str, state: dict, context: Any, prefix: str, ambiguous: bool) -> bool:
    """Whether the task `task_id` (its `state` read) is one of this container's, by the rule of
    TaskService: an id made for this very container (not one that only starts with its prefix,
    like container "a-x"'s for "a"), and, where another database makes the same ids, a state
    whose stored message names this database and container."""
    return in_container(task_id, prefix) and (not ambiguous or _owns(state, context))


class TaskService(Service):
    """A task of this container, or 404: ids of other containers are never served."""

    async def task_state(self) -> TaskState:
        task_id = self.request.matchdict["task_id"]
        prefix = _container_prefix(self.context)
        if not in_container(task_id, prefix):
            raise HTTPNotFound(content=NOT_FOUND)
        if not await get_state_manager().exists(task_id):
            raise HTTPNotFound(content=NOT_FOUND)
        if _lookalike_prefix(prefix) and not await _owned(task_id, self.context):
            raise HTTPNotFound(content=NOT_FOUND)
        return TaskState(task_id)


@_service(
    "GET",
    "@amqp-tasks",
    "@amqp-info",
    "This container's task ids, newest first; with ?limit=, ?cursor= or ?status=, "
    "a page of task summaries and the cursor of the next page",
)
async def list_tasks(context: Any, request: Any) -> Any:
    prefix = _container_prefix(context)
    manager = get_state_manager()
    owned: task_index.Owned | None = None
    if _lookalike_prefix(prefix):

        async def owned_here(task_id: str, state: dict) -> bool:
            return _owns(state, context)

        owned = owned_here
    query = request.query
    if not any(key in query for key in ("limit", "cursor", "status", "function")):
        await manager.adopt_legacy()  # the original's clients list states the original wrote
        found = await task_index.all_ids(manager, prefix)
        if owned is not None:
            found = [task_id for task_id in found if await _owned(task_id, context)]
        return found
    try:
        limit = task_index.check_query(query.get("limit"), query.get("status"))
        page = await task_index.page(
            manager,
            prefix,
            limit,
            query.get("cursor"),
            query.get("status"),
            owned,
            query.get("function") or None,
        )
    except ValueError as exc:
        raise HTTPBadRequest(content={"reason": str(exc)})
    return page.as_json()


@_service(
    "GET",
    "@amqp-tasks/{task_id}",
    "@amqp-info/{task_id}",
    "A task's state; job_data only with guillotina.DebugAMQP",
)
class GetTask(TaskService):
    async def __call__(self) -> dict[str, Any]:
        state = await (await self.task_state()).get_state()
        job_data = state.pop("job_data", None)
        if job_data is not None and can_debug_amqp(self.context):
            state["job_data"] = _redacted(job_data)
        return state


def can_debug_amqp(context: Any = None) -> bool:
    """Whether the current user may see tasks' `job_data` (permission guillotina.DebugAMQP)
    on `context`, by default the current container."""
    context = context if context is not None else task_vars.container.get()
    policy: Any = get_security_policy(get_authenticated_user())  # a zope interface to mypy
    return bool(policy.check_permission("guillotina.DebugAMQP", context))


@_service("DELETE", "@amqp-tasks/{task_id}", "@amqp-cancel/{task_id}", "Cancel a task")
class CancelTask(TaskService):
    async def __call__(self) -> bool:
        return await (await self.task_state()).cancel()


@container_service(
    "POST",
    "@amqp-tasks/{task_id}/retry",
    "Run an errored or canceled task again under its id (409 with a reason otherwise)",
)
class RetryTask(TaskService):
    async def __call__(self) -> dict[str, Any]:
        task = await self.task_state()
        try:
            await retry_task(task.task_id)
        except RetryRefused as exc:
            raise HTTPConflict(content={"reason": str(exc)})
        # what the retry did (by the time of this answer a worker may have run it already)
        return {"task_id": task.task_id, "status": TaskStatus.SCHEDULED}


@container_service(
    "GET", "@amqp-workers", "Live workers, their load and which of this container's tasks they run"
)
async def list_workers(context: Any, request: Any) -> list[dict[str, Any]]:
    prefix = _container_prefix(context)
    found = []
    for worker in await get_state_manager().workers():
        running = worker.get("running") or []
        # a worker serves every container: name only this container's tasks
        worker["running"] = [task for task in running if in_container(task["task_id"], prefix)]
        worker["running_total"] = len(running)
        found.append(worker)
    return sorted(found, key=lambda worker: worker.get("started") or 0)


@container_service(
    "GET",
    "@amqp-queues",
    "Messages waiting in the main, delay and error queues (amqp.queue's, those live workers "
    "consume and those named by ?queue=), and tasks ended over the last hour",
)
async def list_queues(context: Any, request: Any) -> dict[str, Any]:
    asked = request.query.getall("queue", [])
    consumed = [queue for worker in await get_state_manager().workers() for queue in _consumed(worker)]
    try:
        depths = await queues.depths(get_settings(), [*consumed, *asked])
    except ValueError as exc:  # a ?queue= RabbitMQ would refuse as a name
        raise HTTPBadRequest(content={"reason": str(exc)})
    chart = await task_index.throughput(get_state_manager(), _container_prefix(context))
    return {"queues": depths, "throughput": chart}


def _consumed(worker: dict[str, Any]) -> list[str]:
    """The queues a live worker announced it consumes (its `queue` is their names, comma-joined)."""
    announced = worker.get("queue")
    return [name for name in announced.split(", ") if name] if isinstance(announced, str) else []


@container_service(
    "POST",
    "@amqp-queues/dead-letters/requeue",
    'Move this container\'s dead letters (all, or those of {"task_id": ...}; of amqp.queue, or '
    'of {"queue": ...}) back into the queue they died in; those that do not verify are refused, '
    "left in the error queue, each with its reason",
)
async def requeue_dead_letters(context: Any, request: Any) -> dict[str, Any]:
    body = await _json_body(request)
    task_id = body.get("task_id")
    if task_id is not None and not isinstance(task_id, str):
        raise HTTPBadRequest(content={"reason": "task_id must be a string"})
    queue = body.get("queue")
    try:
        queues.family(get_settings(), queue)
    except ValueError as exc:
        raise HTTPBadRequest(content={"reason": str(exc)})
    prefix = _container_prefix(context)
    ambiguous = _lookalike_prefix(prefix)

    def ours(message: Any) -> bool:
        # the error queue holds every container's dead letters: only this one's are touched
        task = message if isinstance(message, dict) else {}
        return isinstance(task.get("task_id"), str) and visible(
            task["task_id"], task, context, prefix, ambiguous
        )

    done = await queues.requeue(get_settings(), task_id, ours, queue)
    return {
        "requeued": [letter.describe()["task_id"] for letter in done.moved],
        "refused": [{"task_id": letter.describe()["task_id"], "reason": why} for letter, why in done.refused],
    }


async def _json_body(request: Any) -> dict[str, Any]:
    """The request's JSON object (an empty body is {}); 400 for anything else."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise HTTPBadRequest(content={"reason": "the body must be a JSON object"})
    return body


def _redacted(job_data: dict) -> dict:
    """job_data without credentials, should an old message have carried any."""
    req_data = dict(job_data.get("req_data") or {})
    req_data["headers"] = public_headers(req_data.get("headers"))
    user = dict(req_data.get("user") or {})
    user["headers"] = public_headers(user.get("headers"))
    req_data["user"] = user
    return {**job_data, "req_data": req_data}
