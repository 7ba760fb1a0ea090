"""Task messages: build the body (docs/design.md#messages) from a request, sign it, decode it safely."""

import hashlib
import hmac
import string
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from guillotina.auth.users import ROOT_USER_ID
from guillotina.interfaces import Allow, AllowSingle, IPrincipal, IRequest
from guillotina.utils import get_object_url

from guillotina_amqp import options, replay, runs
from guillotina_amqp.exceptions import InvalidMessage, MessageRefused
from guillotina_amqp.names import check_task_id
from guillotina_amqp.settings import AMQPSettings
from guillotina_amqp.types import SerializedRequest, SerializedUser, TaskMessage

SIGNATURE_HEADER = "x-guillotina-amqp-signature"
_SIGNATURE_LENGTH = 64  # hex digits of an HMAC-SHA256
_HEX = frozenset(string.hexdigits)
REQUIRED_FIELDS = tuple(sorted(TaskMessage.__required_keys__))
#: Every top-level field a message may carry (types.TaskMessage); anything else is refused (it
#: would be stored as job_data).
FIELDS = frozenset(TaskMessage.__annotations__)

# The worker logs the user in from the explicit `user` block, so credentials
# carried by the scheduling request are never needed there: keep them out of
# the broker, the state store and the logs.
SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
#: Query parameters carrying credentials (guillotina's websocket token, OAuth-style tokens).
SECRET_QUERY = frozenset({"ws_token", "access_token"})


#: headers RabbitMQ writes when it dead-letters a message; a forged, malformed one crashes
#: RabbitMQ 3.10's next dead-lettering of it, so we never pass them on
_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


def forwarded_headers(headers: Any) -> dict[str, Any]:
    """The headers of a message we publish again (delay, error queue): the broker's death records dropped."""
    if not isinstance(headers, dict):
        return {}
    return {k: v for k, v in headers.items() if isinstance(k, str) and not k.startswith(_DEATH_HEADERS)}


def public_url(url: str | None) -> str | None:
    """`url` without credentials in its query string."""
    if not url or "?" not in url:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k.lower() not in SECRET_QUERY]
    if len(kept) == len(query):
        return url
    return urlunsplit(parts._replace(query=urlencode(kept)))


def public_headers(headers: Any) -> dict[str, str]:
    """Request headers minus credentials, as plain str (orjson refuses multidict's istr keys)."""
    return {str(k): str(v) for k, v in dict(headers or {}).items() if k.lower() not in SECRET_HEADERS}


def _granted(settings: dict | None) -> list[str]:
    """Names of the roles a principal holds (granted, not denied)."""
    return [name for name, value in (settings or {}).items() if value in (1, True, Allow, AllowSingle)]


def user_data(user: IPrincipal | None) -> SerializedUser:
    if user is None:
        return {"id": None, "roles": [], "groups": [], "headers": {}, "data": {}}
    return {
        "id": user.id,
        "roles": _granted(getattr(user, "roles", None)),
        "groups": list(getattr(user, "groups", None) or []),
        "headers": public_headers(getattr(user, "headers", None)),
        "data": _json_safe(getattr(user, "data", None) or getattr(user, "properties", None) or {}),
    }


def _json_safe(value: dict) -> dict:
    safe = {}
    for key, item in dict(value).items():
        try:
            orjson.dumps(item)
        except TypeError:
            continue
        safe[str(key)] = item
    return safe


def request_data(
    request: IRequest | None, user: IPrincipal | None, container: Any = None
) -> SerializedRequest:
    """The `req_data` block: what the worker needs to rebuild the request."""
    if request is None:
        return {
            "url": None,
            "method": "POST",
            "headers": {},
            "annotations": {},
            "container_url": None,
            "user": user_data(user),
        }
    return {
        "url": public_url(str(request.url)),
        "method": request.method,
        "headers": public_headers(request.headers),
        "annotations": _json_safe(annotations_of(request)),
        "container_url": get_object_url(container, request) if container is not None else None,
        "user": user_data(user),
    }


def annotations_of(request: IRequest) -> dict[str, Any]:
    """What a request carries for the code it reaches: its items, and the dict an application
    of the original plugin's time set as `request.annotations`."""
    # Request iterates its keys but has no keys(): dict(request) would raise
    annotations = {key: request[key] for key in request}
    legacy = getattr(request, "annotations", None)
    return {**annotations, **legacy} if isinstance(legacy, dict) else annotations


def is_root(req_data: dict) -> bool:
    return (req_data.get("user") or {}).get("id") == ROOT_USER_ID


def split_url(url: str | None) -> tuple[str, str, bytes]:
    """(scheme, path, query string) of a request url."""
    if not url:
        return "http", "/", b""
    parts = urlsplit(url)
    return parts.scheme or "http", parts.path or "/", parts.query.encode()


def encode(message: dict, settings: AMQPSettings) -> bytes:
    """JSON body of a message; MessageRefused (a ValueError and a TypeError) says why it cannot be sent."""
    try:
        body = orjson.dumps(message)
    except TypeError as exc:
        raise MessageRefused(f"task arguments must be JSON-serializable: {exc}") from None
    if len(body) > settings.max_message_bytes:
        raise MessageRefused(_too_large(body, settings))
    return body


def _too_large(body: bytes, settings: AMQPSettings) -> str:
    limit = settings.max_message_bytes
    return f"message of {len(body)} bytes is larger than amqp.max_message_bytes ({limit})"


def signature(body: bytes, key: str) -> str:
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def sign_headers(body: bytes, settings: AMQPSettings) -> dict[str, str]:
    """Message headers carrying the body's HMAC when a signing key is configured."""
    if not settings.signing_key:
        return {}
    return {SIGNATURE_HEADER: signature(body, settings.signing_key)}


def verify(body: bytes, headers: dict | None, settings: AMQPSettings) -> None:
    """Raise InvalidMessage unless the body is signed with a current or previous key."""
    if not settings.signing_key:
        return
    given = _signature_header(headers)
    for key in (settings.signing_key, *settings.previous_signing_keys):
        if hmac.compare_digest(signature(body, key), given):
            return
    raise InvalidMessage("message signature does not match any signing key")


def _signature_header(headers: dict | None) -> str:
    """The signature header, checked to be what we send: 64 ASCII hex digits."""
    given = (headers or {}).get(SIGNATURE_HEADER)
    if not given:
        raise InvalidMessage("unsigned message refused (amqp.signing_key is set)")
    if isinstance(given, bytes):
        given = given.decode("ascii", errors="replace")
    if not isinstance(given, str) or len(given) != _SIGNATURE_LENGTH or not _HEX.issuperset(given):
        raise InvalidMessage(f"signature header is not {_SIGNATURE_LENGTH} hex digits")
    return given


def trusted_identity(body: bytes, headers: dict | None, settings: AMQPSettings) -> tuple[str, str] | None:
    """(task id, run) of an authentic message, even one that cannot run; None if unknown or forged.

    A refused message's state is marked errored under this id, so an unsigned
    message must not be able to name (and spoil) someone else's task.
    """
    try:
        verify(body, headers, settings)
        message = orjson.loads(body)
        run = message.get("run", "")
        # a malformed run is recorded as none: it could otherwise order the id's later runs
        return check_task_id(message.get("task_id")), run if runs.RUN_PATTERN.fullmatch(str(run)) else ""
    except (InvalidMessage, ValueError, AttributeError, TypeError):  # JSONDecodeError is a ValueError
        return None


def decode(body: bytes, headers: dict | None, settings: AMQPSettings) -> TaskMessage:
    """The message dict, or InvalidMessage saying what is wrong with it."""
    if len(body) > settings.max_message_bytes:
        raise InvalidMessage(_too_large(body, settings))
    verify(body, headers, settings)
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidMessage("body is not a JSON object")
    task_id = _task_id(message)
    _check_fields(message, task_id, settings)
    _drop_credentials(message["req_data"])
    try:
        orjson.dumps(message)  # what cannot be encoded again could never be stored as job_data
    except TypeError as exc:
        raise InvalidMessage(f"message cannot be stored: {exc}", task_id) from None
    return cast(TaskMessage, message)


def _task_id(message: dict) -> str | None:
    if message.get("task_id") in (None, ""):
        return None  # told as missing by _check_fields
    try:
        return check_task_id(message["task_id"])
    except ValueError as exc:
        raise InvalidMessage(f"invalid task_id: {exc}") from None


def _check_fields(message: dict, task_id: str | None, settings: AMQPSettings) -> None:
    unknown = sorted(str(name)[:40] for name in set(message) - FIELDS)
    if unknown:
        raise InvalidMessage(f"unknown fields {', '.join(unknown[:5])}", task_id)
    missing = [
        name for name in REQUIRED_FIELDS if not isinstance(message.get(name), str) or not message[name]
    ]
    if missing:
        raise InvalidMessage(f"message lacks {', '.join(missing)}", task_id)
    if not isinstance(message.setdefault("args", []), list):
        raise InvalidMessage("'args' is not a list", task_id)
    if not isinstance(message.setdefault("kwargs", {}), dict):
        raise InvalidMessage("'kwargs' is not an object", task_id)
    if not isinstance(message.setdefault("req_data", {}), dict):
        raise InvalidMessage("'req_data' is not an object", task_id)
    try:
        runs.check_run(message.setdefault("run", ""))
    except ValueError as exc:
        raise InvalidMessage(str(exc), task_id) from None
    for name in ("db_id", "container_id"):
        if not isinstance(message.setdefault(name, None), (str, type(None))):
            raise InvalidMessage(f"'{name}' is neither a string nor null", task_id)
    try:
        options.check_fields(message)  # a hostile value is refused here, never met by the worker
    except ValueError as exc:
        raise InvalidMessage(str(exc), task_id) from None
    _check_request(message["req_data"], task_id)
    replay.check_fresh(message, settings, task_id)


#: req_data's fields and the types the worker can rebuild a request and a user from
_REQUEST_TYPES: dict[str, tuple[type, ...]] = {
    "url": (str, type(None)),
    "method": (str,),
    "headers": (dict,),
    "annotations": (dict,),
    "container_url": (str, type(None)),
    "user": (dict,),
}
_USER_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str, type(None)),
    "roles": (list,),
    "groups": (list,),
    "headers": (dict,),
    "data": (dict,),
}


def _check_request(req_data: dict, task_id: str | None) -> None:
    for where, block, types in (
        ("req_data", req_data, _REQUEST_TYPES),
        ("user", req_data.get("user"), _USER_TYPES),
    ):
        for name, allowed in types.items():
            if isinstance(block, dict) and name in block and not isinstance(block[name], allowed):
                raise InvalidMessage(f"'{where}.{name}' is not a {allowed[0].__name__}", task_id)
    user = req_data.get("user") or {}
    for name in ("roles", "groups"):
        if not all(isinstance(item, str) for item in user.get(name) or ()):
            raise InvalidMessage(f"'user.{name}' holds something other than names", task_id)


def _drop_credentials(req_data: dict) -> None:
    """Strip credentials older publishers put in a message, before it is stored as job_data."""
    if isinstance(req_data.get("url"), str):
        req_data["url"] = public_url(req_data["url"])
    if isinstance(req_data.get("headers"), dict):
        req_data["headers"] = public_headers(req_data["headers"])
    user = req_data.get("user")
    if isinstance(user, dict) and isinstance(user.get("headers"), dict):
        user["headers"] = public_headers(user["headers"])
