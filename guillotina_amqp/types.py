"""Shapes of the data a task message carries (docs/design.md#messages), for type hints.

`SerializedRequest` is the message's `req_data`: what `utils.serialize_request`
returns and `utils.make_request` rebuilds a request from.
"""

from typing import Any, TypedDict


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
