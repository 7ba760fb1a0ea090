"""Task messages: build the body of SPEC §3 from a request, sign it, decode it safely."""

import hashlib
import hmac
from typing import Any
from urllib.parse import urlsplit

import orjson
from guillotina.auth.users import ROOT_USER_ID
from guillotina.interfaces import Allow, AllowSingle, IPrincipal, IRequest
from guillotina.utils import get_object_url

from guillotina_amqp.exceptions import InvalidMessage
from guillotina_amqp.settings import AMQPSettings
from guillotina_amqp.types import SerializedRequest, SerializedUser

SIGNATURE_HEADER = "x-guillotina-amqp-signature"
REQUIRED_FIELDS = ("func", "task_id")

# The worker logs the user in from the explicit `user` block, so credentials
# carried by the scheduling request are never needed there: keep them out of
# the broker, the state store and the logs.
SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})


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
        "url": request.url,
        "method": request.method,
        "headers": public_headers(request.headers),
        # Request iterates its keys but has no keys(): dict(request) would raise
        "annotations": _json_safe({key: request[key] for key in request}),
        "container_url": get_object_url(container, request) if container is not None else None,
        "user": user_data(user),
    }


def is_root(req_data: dict) -> bool:
    return (req_data.get("user") or {}).get("id") == ROOT_USER_ID


def split_url(url: str | None) -> tuple[str, str, bytes]:
    """(scheme, path, query string) of a request url."""
    if not url:
        return "http", "/", b""
    parts = urlsplit(url)
    return parts.scheme or "http", parts.path or "/", parts.query.encode()


def encode(message: dict) -> bytes:
    """JSON body of a message; TypeError names what cannot be serialized."""
    try:
        return orjson.dumps(message)
    except TypeError as exc:
        raise TypeError(f"task arguments must be JSON-serializable: {exc}") from None


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
    given = (headers or {}).get(SIGNATURE_HEADER)
    if not given:
        raise InvalidMessage("unsigned message refused (amqp.signing_key is set)")
    if isinstance(given, bytes):
        given = given.decode(errors="replace")
    for key in (settings.signing_key, *settings.previous_signing_keys):
        if hmac.compare_digest(signature(body, key), str(given)):
            return
    raise InvalidMessage("message signature does not match any signing key")


def trusted_task_id(body: bytes, headers: dict | None, settings: AMQPSettings) -> str | None:
    """The task id of an authentic message, even one that cannot run; None if unknown or forged.

    A refused message's state is marked errored under this id, so an unsigned
    message must not be able to name (and spoil) someone else's task.
    """
    try:
        verify(body, headers, settings)
        task_id = orjson.loads(body).get("task_id")
    except (InvalidMessage, orjson.JSONDecodeError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) and task_id else None


def decode(body: bytes, headers: dict | None, settings: AMQPSettings) -> dict:
    """The message dict, or InvalidMessage saying what is wrong with it."""
    verify(body, headers, settings)
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidMessage("body is not a JSON object")
    task_id = message.get("task_id")
    task_id = task_id if isinstance(task_id, str) and task_id else None
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
    _drop_credentials(message["req_data"])
    message.setdefault("db_id", None)
    message.setdefault("container_id", None)
    return message


def _drop_credentials(req_data: dict) -> None:
    """Strip credentials older publishers put in a message, before it is stored as job_data."""
    if isinstance(req_data.get("headers"), dict):
        req_data["headers"] = public_headers(req_data["headers"])
    user = req_data.get("user")
    if isinstance(user, dict) and isinstance(user.get("headers"), dict):
        user["headers"] = public_headers(user["headers"])
