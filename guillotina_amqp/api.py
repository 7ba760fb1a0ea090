"""REST services on containers: list, read and cancel tasks (SPEC §7)."""

from typing import Any, Callable, TypeVar

from guillotina import configure, task_vars
from guillotina.api.service import Service
from guillotina.component import get_utility
from guillotina.interfaces import IApplication, IContainer, IDatabase
from guillotina.response import HTTPNotFound
from guillotina.utils import get_authenticated_user, get_security_policy

from guillotina_amqp.message import public_headers
from guillotina_amqp.names import in_container, task_id_prefix
from guillotina_amqp.state import TaskState, get_state_manager

NOT_FOUND = {"reason": "Task not found"}
Handler = TypeVar("Handler", bound=Callable[..., Any])


def _service(method: str, name: str, alias: str, summary: str) -> Callable[[Handler], Handler]:
    """Register a service on containers under its name and the original plugin's old name."""

    def register(handler: Handler) -> Handler:
        deprecated = f"Deprecated alias of {method} {name}"
        for service_name, text in ((name, summary), (alias, deprecated)):
            configure.service(
                context=IContainer,
                method=method,
                name=service_name,
                permission="guillotina.ManageAMQP",
                summary=text,
            )(handler)
        return handler

    return register


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
    state = await get_state_manager().get(task_id)
    job_data = state.get("job_data") or state
    db = task_vars.db.get()
    return job_data.get("db_id") == getattr(db, "id", None) and job_data.get("container_id") == context.id


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


@_service("GET", "@amqp-tasks", "@amqp-info", "List the ids of this container's tasks")
async def list_tasks(context: Any, request: Any) -> list[str]:
    prefix = _container_prefix(context)
    found = [task_id async for task_id in get_state_manager().list(prefix) if in_container(task_id, prefix)]
    if _lookalike_prefix(prefix):
        found = [task_id for task_id in found if await _owned(task_id, context)]
    return found


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


def _redacted(job_data: dict) -> dict:
    """job_data without credentials, should an old message have carried any."""
    req_data = dict(job_data.get("req_data") or {})
    req_data["headers"] = public_headers(req_data.get("headers"))
    user = dict(req_data.get("user") or {})
    user["headers"] = public_headers(user.get("headers"))
    req_data["user"] = user
    return {**job_data, "req_data": req_data}
