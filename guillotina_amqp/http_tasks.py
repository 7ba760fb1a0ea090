"""HTTP tasks (docs/tasks.md#http-tasks): a task that is a request to a URL, made by a worker.

2xx finishes the task with `{"status", "headers", "body"}`; 5xx, connection errors and
timeouts fail it like any task (retried through the delay queue); 4xx fails it for good.

A worker must not become a way to reach arbitrary addresses (server-side request
forgery): only URLs whose scheme, host and port are in `amqp.http_tasks.allowed` are
requested, checked when the task is scheduled and again by the worker, and redirects
are followed only to allowed URLs. Hosts are compared by name, as written: the
operator's DNS says where an allowed name points, a URL cannot reach a host by another
spelling (its address, a decimal IP). Credentials never travel in the message: a task
names secrets (`secret_headers={"Authorization": "billing"}`) whose values only the
workers' `amqp.http_tasks.secrets` hold.
"""

from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from guillotina_amqp import registry
from guillotina_amqp.exceptions import Fail
from guillotina_amqp.message import SECRET_HEADERS, public_url
from guillotina_amqp.settings import HTTPTasksSettings, get_settings
from guillotina_amqp.state import TaskState
from guillotina_amqp.utils import add_task

if TYPE_CHECKING:  # aiohttp is imported where a request is made: importing it costs every
    import aiohttp  # process (the worker's start-up above all) about 0.3 s, most never use it
    import yarl  # and yarl where a URL is read (≈ 10 ms of every start otherwise)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: redirects followed (each to an allowed URL) before the task fails for good
MAX_REDIRECTS = 5
#: answer headers a result never keeps: credentials the executor hands out
SECRET_ANSWER_HEADERS = SECRET_HEADERS | {"set-cookie"}
#: characters of the answer's body an error message quotes
QUOTED_BODY = 500


class HTTPTaskError(Exception):
    """The executor answered 5xx: the task is retried like any failure."""


async def add_http_task(
    url: str,
    method: str = "POST",
    json: Any = None,
    headers: dict[str, str] | None = None,
    secret_headers: dict[str, str] | None = None,
    **options: Any,
) -> TaskState | None:
    """Schedule a request to `url` on a worker and return its TaskState.

    `json`: the request's JSON body; `headers`: plain headers (no credentials: those are
    refused, as they would be stored with the task); `secret_headers`: header name -> the
    name of a secret in `amqp.http_tasks.secrets`, whose value the worker sends. `options`
    are add_task's (`_task_id`, `_queue`, `_retries`, `_request`...).

    ValueError, nothing published, for a URL outside `amqp.http_tasks.allowed` (all of
    them while it is empty), a method that is not an HTTP method, credential or malformed
    headers, an unknown secret.
    """
    unknown = sorted(name for name in options if not name.startswith("_"))
    if unknown:
        raise TypeError(f"add_http_task() got unexpected keyword arguments: {', '.join(unknown)}")
    request = check_request(url, method, headers, secret_headers, get_settings().http_tasks)
    return await add_task(http_request, *request, json, **options)


def check_request(
    url: Any, method: Any, headers: Any, secret_headers: Any, settings: HTTPTasksSettings
) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """(url, METHOD, headers, secret_headers) checked; ValueError saying what is wrong."""
    check_url(url, settings)
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ValueError(f"{method!r} is not an HTTP method ({', '.join(sorted(METHODS))})")
    headers, secret_headers = _header_dict(headers), _header_dict(secret_headers)
    for name in headers:
        if name.lower() in SECRET_HEADERS:
            raise ValueError(
                f"header {name!r} carries credentials, which would be stored with the task: put the "
                "value in amqp.http_tasks.secrets and name it with secret_headers="
            )
    for name, secret in secret_headers.items():
        if secret not in settings.secrets:
            raise ValueError(f"secret {secret!r} (header {name!r}) is not in amqp.http_tasks.secrets")
    return str(url), method.upper(), headers, secret_headers


def check_url(url: Any, settings: HTTPTasksSettings) -> "yarl.URL":
    """`url` parsed (as aiohttp will), if its scheme, host and port are allowed; else ValueError."""
    if not isinstance(url, str):
        raise ValueError(f"the URL must be a string, not {type(url).__name__}")
    if not settings.allowed:
        raise ValueError("HTTP tasks are off: amqp.http_tasks.allowed is empty")
    try:
        parsed = _url(url)
    except ValueError as exc:
        raise ValueError(f"invalid URL {url[:200]!r}: {exc}") from None
    if not parsed.is_absolute() or parsed.scheme not in ("http", "https"):
        raise ValueError(f"URL {url[:200]!r} is not an absolute http or https URL")
    if parsed.user is not None or parsed.password is not None or public_url(url) != url:
        raise ValueError(f"URL {parsed.with_user(None).with_query(None)} carries credentials")
    if _origin(parsed) not in _allowed_origins(settings):
        raise ValueError(
            f"URL {url[:200]!r} is not allowed: {parsed.origin()} is not in amqp.http_tasks.allowed"
        )
    return parsed


def _url(text: str = "") -> "yarl.URL":
    import yarl

    return yarl.URL(text)


def _origin(url: "yarl.URL") -> tuple[str, str, int | None]:
    return url.scheme, url.host or "", url.port


def _allowed_origins(settings: HTTPTasksSettings) -> set[tuple[str, str, int | None]]:
    origins = set()
    for entry in settings.allowed:
        try:
            parsed = _url(entry)
        except ValueError:
            parsed = _url()
        if not parsed.is_absolute() or parsed.path not in ("", "/") or parsed.query_string:
            raise ValueError(f"amqp.http_tasks.allowed: {entry!r} is not scheme://host[:port]")
        origins.add(_origin(parsed))
    return origins


def _header_dict(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise ValueError(f"headers must be a dict of strings, not {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise ValueError(f"header {name!r}: names and values must be strings")
        if any(c in name + value for c in "\r\n\0") or any(c in name for c in " :"):
            raise ValueError(f"header {name!r}: forbidden characters in its name or value")
    return headers


class _Call(NamedTuple):
    """One request of an HTTP task (the first, or one a redirect asks for)."""

    method: str
    url: str
    json: Any
    headers: dict[str, str]  # as sent: secrets included


async def http_request(
    url: str, method: str, headers: dict[str, str], secret_headers: dict[str, str], json: Any = None
) -> dict[str, Any]:
    """The task a worker runs for add_http_task: the request, checked again here."""
    settings = get_settings().http_tasks
    try:
        url, method, headers, secret_headers = check_request(url, method, headers, secret_headers, settings)
    except ValueError as exc:
        raise Fail(f"refused: {exc}") from None
    secrets = {name: settings.secrets[secret] for name, secret in secret_headers.items()}
    call = _Call(method, url, json, {**headers, **secrets})
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    # trust_env=False: no HTTP_PROXY from the environment between the worker and the allowed host
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.request(
                call.method, _url(call.url), json=call.json, headers=call.headers, allow_redirects=False
            ) as answer:
                if answer.status not in REDIRECTS:
                    return await _result(answer, call)
                call = _redirected(answer, call, headers, settings)
    raise Fail(f"more than {MAX_REDIRECTS} redirects from {method} {url}")


def _redirected(
    answer: "aiohttp.ClientResponse", call: _Call, plain_headers: dict[str, str], settings: HTTPTasksSettings
) -> _Call:
    """The request a redirect asks for, if it goes to an allowed URL; else Fail."""
    location = answer.headers.get("Location")
    if not location:
        raise Fail(f"HTTP {answer.status} without Location from {call.method} {call.url}")
    target = str(_url(call.url).join(_url(location)))
    try:
        check_url(target, settings)
    except ValueError as exc:
        raise Fail(f"redirect from {call.url} refused: {exc}") from None
    if answer.status == 303 or (answer.status in (301, 302) and call.method not in ("GET", "HEAD")):
        call = call._replace(method="GET", json=None)  # what browsers and aiohttp do
    if _origin(_url(target)) != _origin(_url(call.url)):
        call = call._replace(headers=dict(plain_headers))  # secrets were meant for the first origin only
    return call._replace(url=target)


async def _result(answer: "aiohttp.ClientResponse", call: _Call) -> dict[str, Any]:
    raw = await _read_bounded(answer, call, get_settings().http_tasks.max_body_bytes)
    body = _body(answer, raw)
    quoted = f"HTTP {answer.status} from {call.method} {call.url}: {str(body)[:QUOTED_BODY]}"
    if answer.status >= 500:
        raise HTTPTaskError(quoted)
    if not 200 <= answer.status < 300:
        raise Fail(quoted)
    # str(): multidict's istr names are no JSON keys to orjson
    kept = {str(k): v for k, v in answer.headers.items() if k.lower() not in SECRET_ANSWER_HEADERS}
    return {"status": answer.status, "headers": kept, "body": body}


#: bytes read from an answer at a time
READ_CHUNK = 65536


async def _read_bounded(answer: "aiohttp.ClientResponse", call: _Call, limit: int) -> bytes:
    """The answer's body, or Fail once it is larger than `limit`: it becomes the task's result
    (a state, the REST answer, the dashboard), so a host must not fill them (or the worker's
    memory) with what it sends. Read no further than the limit, whatever Content-Length says."""
    too_large = Fail(
        f"HTTP {answer.status} from {call.method} {call.url}: the answer's body is larger than "
        f"amqp.http_tasks.max_body_bytes ({limit} bytes)"
    )
    if answer.content_length is not None and answer.content_length > limit:
        raise too_large
    raw = bytearray()
    async for chunk in answer.content.iter_chunked(READ_CHUNK):
        raw += chunk
        if len(raw) > limit:
            raise too_large
    return bytes(raw)


def _body(answer: "aiohttp.ClientResponse", raw: bytes) -> Any:
    """The answer's body: decoded JSON when it says it is JSON (and is), else text."""
    content_type = answer.content_type or ""
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            pass
    return raw.decode(answer.charset or "utf-8", errors="replace")


registry.register(http_request)
