"""The `amqp` settings block (docs/settings.md) read as one typed, checked object.

`AMQPSettings` declares every setting once: name, type and default. `DEFAULTS`
(what the add-on puts in `app_settings["amqp"]`) is derived from it, and
`get_settings()` reads each value as its declared type, so strings that
guillotina takes from the environment (`G_AMQP__MAX_TASK_RETRIES=3`) or from
`--override amqp.port=5673` come out as numbers, None, booleans and lists.
"""

import collections.abc
import copy
import dataclasses
import json
import os
import types
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from typing import Any, Callable, Mapping, Union, get_args, get_origin, get_type_hints

from guillotina import app_settings

from guillotina_amqp.exceptions import AMQPConfigurationNotFoundError, InvalidSettings

#: field metadata: the setting lives at the top level of the configuration, not in the block
TOP_LEVEL = "top_level"
#: field metadata: an empty string is refused (an empty signing key would sign with "")
NON_EMPTY = "non_empty"

#: queue types `amqp.queue_type` accepts
QUEUE_TYPES = ("classic", "quorum")
#: quorum queues get names of their own: RabbitMQ refuses to re-declare a queue with other arguments
QUORUM_SUFFIX = "-quorum"


@dataclass(frozen=True)
class HTTPTasksSettings:
    """The `amqp.http_tasks` block (docs/tasks.md#http-tasks): HTTP tasks are off while `allowed` is empty."""

    #: the origins HTTP tasks may request, each "scheme://host:port" ("https://api.internal:443")
    allowed: tuple[str, ...] = ()
    #: seconds one request may take, from connecting to reading the whole answer
    timeout: float = 30
    #: secret name -> header value, for headers a task names with `secret_headers=`; the values
    #: live in the workers' configuration only, never in messages, states or logs
    secrets: dict[str, str] = field(default_factory=dict, hash=False, repr=False)
    #: bytes an answer's body may have: it is stored as the task's result (larger: errored)
    max_body_bytes: int = 1048576


@dataclass(frozen=True)
class AMQPSettings:
    """Every setting of the `amqp` block, defaults filled in.

    The one place a setting is declared: its type says how a value given as text
    (an environment variable) is read, and its default reaches `app_settings["amqp"]`.
    """

    # a dotted name, or the callable itself (guillotina's resolve_dotted_name takes either)
    connection_factory: str | Callable[..., Any] = "aioamqp.connect"
    host: str = "localhost"
    port: int = 5672
    login: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: int = 120
    exchange: str = "guillotina"
    queue: str = "guillotina"
    persistent_manager: str = "memory"
    max_running_tasks: int = 20
    state_ttl: int = 86400
    max_task_retries: int | None = 5
    delayed_ttl_ms: int = 120000
    errored_ttl_ms: int = 604800000
    beaconttl: float = 30
    # beyond the original: liveness, shutdown, security (docs/settings.md)
    noop_after: float = 200
    kill_after: float = 300
    shutdown_timeout: float = 30
    update_status_interval: float = 20
    lock_ttl: int = 60
    allowed_tasks: tuple[str, ...] | None = None
    signing_key: str | None = field(default=None, repr=False, metadata={NON_EMPTY: True})
    previous_signing_keys: tuple[str, ...] = field(default=(), repr=False)
    #: seconds a signed message stays valid after it was issued, on top of the waits it asked
    #: for itself (its countdown, its retries); None: state_ttl. Older: a replay, refused
    replay_window: int | None = None
    # bounds on what one message may cost (issue 16)
    max_message_bytes: int = 1048576
    max_eventlog: int = 1000
    # beyond one machine (docs/operations.md#production-topology)
    hosts: tuple[str, ...] = ()
    queue_type: str = "classic"
    # task control (docs/tasks.md)
    task_timeout: float | None = None
    retry_backoff: bool = False
    retry_backoff_max_ms: int = 3600000
    eager: bool = False
    # HTTP tasks (docs/tasks.md#http-tasks)
    http_tasks: HTTPTasksSettings = HTTPTasksSettings()
    # top level of the configuration, not in the block
    redis_prefix_key: str = field(default="amqpjobs-", metadata={TOP_LEVEL: True})

    def addresses(self) -> list[tuple[str, int]]:
        """The brokers to connect to, in order: `hosts` ("host:port", the port defaulting to
        `port`) or else `host`:`port`."""
        if not self.hosts:
            return [(self.host, self.port)]
        return [_address(entry, self.port) for entry in self.hosts]


def _plain(value: Any) -> Any:
    """A default as the configuration writes it (YAML and JSON know lists, not tuples)."""
    if is_dataclass(value):  # a block of settings inside the block
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return list(value) if isinstance(value, tuple) else value


#: The block's defaults, as the add-on's `app_settings["amqp"]` carries them.
DEFAULTS: dict[str, Any] = {
    f.name: _plain(f.default) for f in fields(AMQPSettings) if not f.metadata.get(TOP_LEVEL)
}
_TYPES = get_type_hints(AMQPSettings)
_NONE_WORDS = frozenset({"none", "null"})
_BOOL_WORDS = {"true": True, "false": False}


def is_configured() -> bool:
    """Whether there is an `amqp` block (there is whenever the add-on is loaded)."""
    return isinstance(app_settings.get("amqp"), dict)


@dataclass(frozen=True)
class _Parsed:
    block: dict[str, Any]  # a deep copy of the block these settings were read from
    prefix: Any
    settings: AMQPSettings


_last: _Parsed | None = None


def get_settings() -> AMQPSettings:
    """The current `amqp` settings, read and checked.

    Raise AMQPConfigurationNotFoundError without a block, InvalidSettings (a
    ValueError) naming the setting, and the environment variable it came from,
    when a value cannot be read as its declared type.
    """
    global _last
    block = app_settings.get("amqp")
    if not isinstance(block, dict):
        raise AMQPConfigurationNotFoundError("no 'amqp' block in the application settings")
    prefix = app_settings.get("redis_prefix_key", AMQPSettings.redis_prefix_key)
    last = _last
    # called per add_task and per message: read and check the block again only when it changed
    if last is not None and last.prefix == prefix and last.block == block:
        return last.settings
    settings = parse(block, prefix)
    _last = _Parsed(copy.deepcopy(block), prefix, settings)
    return settings


def parse(block: Mapping[str, Any], prefix: Any = AMQPSettings.redis_prefix_key) -> AMQPSettings:
    """`block` (an `amqp` settings dict) read as AMQPSettings; InvalidSettings when it cannot be."""
    values = {}
    for f in fields(AMQPSettings):
        if f.metadata.get(TOP_LEVEL):
            values[f.name] = _read_setting(f, prefix, (f.name,))
        else:
            values[f.name] = _read_setting(f, block.get(f.name, f.default), ("amqp", f.name))
    return _checked(AMQPSettings(**values))


def _checked(settings: AMQPSettings) -> AMQPSettings:
    """What types alone cannot say: valid hosts, a known queue type (quorum queues have names of
    their own: RabbitMQ refuses to re-declare a queue with other arguments)."""
    for entry in settings.hosts:
        _address(entry, settings.port)  # raises on a bad entry
    if settings.queue_type not in QUEUE_TYPES:
        raise InvalidSettings(f"amqp.queue_type must be one of {QUEUE_TYPES}, not {settings.queue_type!r}")
    if settings.queue_type == "quorum":
        return dataclasses.replace(settings, queue=settings.queue + QUORUM_SUFFIX)
    return settings


def _address(entry: str, default_port: int) -> tuple[str, int]:
    host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", str(default_port))
    if not host or not port.isdigit():
        raise InvalidSettings(f'amqp.hosts: {entry!r} is not "host:port"')
    return host, int(port)


def _read_setting(f: Any, value: Any, path: tuple[str, ...], kind: Any = None) -> Any:
    kind = kind or _TYPES[f.name]
    if isinstance(kind, type) and is_dataclass(kind):
        return _read_block(kind, value, path)
    if value is None and not _is_optional(kind):
        return f.default  # null (or absent) means the default where None is not a value
    try:
        value = coerce(value, kind)
        if f.metadata.get(NON_EMPTY) and value == "":
            raise ValueError(f"must be a non-empty string{' or none' if _is_optional(kind) else ''}")
    except ValueError as exc:
        raise _invalid(path, exc, value, secret=not f.repr) from None
    return value


def _read_block(kind: type, value: Any, path: tuple[str, ...]) -> Any:
    """A block of settings inside the `amqp` block (`http_tasks`), each of its settings read as its
    type and named by its path (`amqp.http_tasks.timeout`) when it cannot be."""
    if value is None or isinstance(value, kind):
        return kind() if value is None else value
    try:
        value = _read_dict(value)  # a JSON object when given as text (--override, environment)
    except (ValueError, TypeError):
        # shown by its type only: it may hold secrets
        raise _invalid(path, ValueError("must be a block of settings"), value, secret=True) from None
    defaults, hints = kind(), get_type_hints(kind)
    read = {}
    for f in fields(kind):
        given = value.get(f.name)
        default = getattr(defaults, f.name)
        read[f.name] = default if given is None else _read_setting(f, given, (*path, f.name), hints[f.name])
    return kind(**read)


def read_top_level(name: str, kind: Any, default: Any) -> Any:
    """A top-level setting of the configuration (e.g. guillotina's `port`) read as `kind`."""
    value = app_settings.get(name)
    if value is None:
        return default
    try:
        return coerce(value, kind)
    except ValueError as exc:
        raise _invalid((name,), exc, value) from None


def _invalid(path: tuple[str, ...], exc: ValueError, value: Any, secret: bool = False) -> InvalidSettings:
    # a secret's value never reaches an error message (or the log that shows it)
    shown = f"a {type(value).__name__}" if secret else repr(value)
    return InvalidSettings(f"{_where(path)} {exc}, not {shown}")


def _where(path: tuple[str, ...]) -> str:
    """The setting's name, and the environment variable it came from if one set it."""
    name = ".".join(path)
    wanted = "g_" + "__".join(path)
    variable = next((k for k in os.environ if k.lower() == wanted), None)
    return f"{name} (environment variable {variable})" if variable else name


def coerce(value: Any, kind: Any) -> Any:
    """`value` read as type `kind`: str, int, float, bool, tuple[str, ...], dict, or X | None.

    Strings are parsed (guillotina reads environment variables as strings):
    "3" -> 3, "none"/"null" -> None where None is allowed, "true"/"false",
    a JSON list for a tuple. ValueError("must be ...") when it cannot be read.
    """
    optional = _is_optional(kind)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    kinds = [k for k in get_args(kind) if k is not type(None)] if _is_union(kind) else [kind]
    for one in kinds:  # the first type that reads the value (e.g. a dotted name or a callable)
        try:
            return _READERS[get_origin(one) or one][1](value)
        except (ValueError, TypeError, LookupError):
            pass
    expected = " or ".join(_READERS[get_origin(one) or one][0] for one in kinds)
    raise ValueError(f"must be {expected}{' or none' if optional else ''}")


def _is_union(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType)


def _is_optional(kind: Any) -> bool:
    return _is_union(kind) and type(None) in get_args(kind)


def _read_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `password: 1234` as a number
    raise TypeError


def _read_number(value: Any, parse: Callable[[str], Any], accepted: tuple[type, ...]) -> Any:
    if isinstance(value, bool):  # YAML reads `port: yes` as True, which Python takes for 1
        raise TypeError
    if isinstance(value, accepted):
        return value
    if isinstance(value, str):
        return parse(value.strip())
    raise TypeError


def _read_callable(value: Any) -> Any:
    if not callable(value):
        raise TypeError
    return value


def _read_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _BOOL_WORDS[value.strip().lower()]
    raise TypeError


def _read_strings(value: Any) -> tuple[str, ...]:
    # a bare string is never split into items: `previous_signing_keys: oldkey` would
    # otherwise accept messages signed with "o"
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            raise ValueError
        value = json.loads(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError
    return tuple(value)


def _read_dict(value: Any) -> dict:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise TypeError
    return value


_READERS: dict[Any, tuple[str, Callable[[Any], Any]]] = {
    str: ("a string", _read_str),
    int: ("an integer", partial(_read_number, parse=int, accepted=(int,))),
    float: ("a number", partial(_read_number, parse=float, accepted=(int, float))),
    bool: ("true or false", _read_bool),
    tuple: ("a list of non-empty strings (JSON in the environment)", _read_strings),
    dict: ("a JSON object", _read_dict),
    collections.abc.Callable: ("a callable", _read_callable),
}
