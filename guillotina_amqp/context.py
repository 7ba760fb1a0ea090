"""The context a task runs in: rebuilt request, db, container, user (docs/design.md#running-a-task).

Guillotina's objects are typed here by class or as Any: mypy reads the methods of a zope
interface (IDatabase, IRegistry...) as if they lacked `self`, so interfaces cannot type them.
"""

import logging
from typing import Any, cast

from guillotina import task_vars
from guillotina.auth.users import GuillotinaUser
from guillotina.auth.utils import set_authenticated_user
from guillotina.component import get_utility
from guillotina.interfaces import ACTIVE_LAYERS_KEY, IApplication, IContainer, IRequest
from guillotina.request import Request
from guillotina.utils import get_database, get_registry, import_class
from zope.interface import alsoProvides

from guillotina_amqp.exceptions import ContainerNotFound
from guillotina_amqp.message import is_root, split_url
from guillotina_amqp.task_vars import amqp_job

logger = logging.getLogger("guillotina_amqp")


def rebuild_request(req_data: dict) -> Request:
    """A request like the one that scheduled the task (url, method, headers, annotations)."""
    scheme, path, query = split_url(req_data.get("url"))
    headers = req_data.get("headers") or {}
    # names as sent: header lookups ignore case, and code that copies them sees the original's
    raw_headers = [(str(k).encode(), str(v).encode()) for k, v in headers.items()]
    request = Request(scheme, req_data.get("method") or "POST", path, query, raw_headers)
    annotations = dict(req_data.get("annotations") or {})
    for key, value in annotations.items():
        request[key] = value
    request.annotations = annotations  # type: ignore[attr-defined]  # where the original's code reads them
    task_vars.request.set(cast(IRequest, request))
    task_vars.futures.set({})
    return request


def user_from(req_data: dict) -> GuillotinaUser:
    """The scheduling user, with the id, roles, groups and data the message carries."""
    if is_root(req_data):
        return get_utility(IApplication, name="root").root_user
    user = req_data.get("user") or {}
    principal = GuillotinaUser(
        user_id=user.get("id") or "guillotina.SystemUser",
        groups=list(user.get("groups") or []),
        roles={role: 1 for role in user.get("roles") or []},
        properties=dict(user.get("data") or {}),
    )
    principal.data = dict(user.get("data") or {})  # type: ignore[attr-defined]
    principal.headers = dict(user.get("headers") or {})  # type: ignore[attr-defined]
    return principal


def login(req_data: dict) -> None:
    set_authenticated_user(user_from(req_data))


async def open_database(db_id: str) -> Any:
    """The task's database; guillotina's DatabaseNotFound (the task errors) if this worker lacks it."""
    db: Any = await get_database(db_id)
    task_vars.db.set(db)
    task_vars.tm.set(db.get_transaction_manager())
    return db


async def enter_container(request: Request, root: Any, container_id: str) -> IContainer:
    """Load the container, make it current and apply its registry and active layers."""
    container = await root.async_get(container_id)
    if container is None or not IContainer.providedBy(container):
        raise ContainerNotFound(f"container {container_id} not found")
    task_vars.container.set(container)
    task_vars.registry.set(None)
    registry: Any = await get_registry(container)
    layers = registry.get(ACTIVE_LAYERS_KEY, []) if registry is not None else []
    for layer in layers:
        try:
            alsoProvides(request, import_class(layer))
        except ModuleNotFoundError:
            logger.error("%s: cannot apply layer %s", getattr(amqp_job.get(None), "label", "Task"), layer)
    return container
