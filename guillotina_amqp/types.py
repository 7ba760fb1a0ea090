"""Shapes of the data a task message carries (docs/design.md#messages), for type hints.

`TaskMessage` is the message itself, every field it may carry declared once (message.FIELDS
is read from it), its per-task options in options.TaskOptions; `SerializedRequest` is its
`req_data`: what `utils.serialize_request` returns and `utils.make_request` rebuilds a request from.
"""

from typing import Any, Required, TypedDict

from guillotina_amqp.options import TaskOptions


class SerializedUser(TypedDict):
    """The scheduling user: the worker logs this principal in (no credentials travel)."""

    id: str | None
    roles: list[str]
    groups: list[str]
    headers: dict[str, str]
    data: dict[str, Any]


class SerializedRequest(TypedDict):
    """The scheduling request, minus its credential headers."""

    url: str | None
    method: str
    headers: dict[str, str]
    annotations: dict[str, Any]
    container_url: str | None
    user: SerializedUser


class TaskMessage(TaskOptions, total=False):
    """A task message (docs/design.md#messages): what add_task publishes, the worker decodes and
    the state keeps as `job_data`. A field not declared here or among the per-task options
    (options.TaskOptions, docs/tasks.md#options) is refused by the worker."""

    func: Required[str]  # the function's dotted name
    task_id: Required[str]
    args: list[Any]
    kwargs: dict[str, Any]
    db_id: str | None
    container_id: str | None
    req_data: SerializedRequest
    run: str  # this run's id (message.new_run)
    # when a signed message was issued (replay.ISSUED: its replays are refused after a while)
    issued: float
