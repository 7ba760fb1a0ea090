"""The `amqp` settings block (docs/settings.md), and the `redis` block as the state store reads
it, each read as one typed, checked object.

`AMQPSettings` declares every setting once: name, type and default. `DEFAULTS`
(what the add-on puts in `app_settings["amqp"]`) is derived from it, and
`get_settings()` reads each value as its declared type, so strings that
guillotina takes from the environment (`G_AMQP__MAX_TASK_RETRIES=3`) or from
`--override amqp.port=5673` come out as numbers, None, booleans and lists.
`RedisSettings` and `get_redis_settings()` do the same for the `redis` block
(`G_REDIS__DB=2`, `G_REDIS__PASSWORD=...`).
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
class TLSSettings:
    """`amqp.ssl` given as a block (`ssl: true` is this block's defaults): TLS to every broker."""

    #: the CA bundle the brokers' certificates must chain to (None: the system's CAs)
    cafile: str | None = None
    #: a client certificate and its key, for brokers that require one (mutual TLS)
    certfile: str | None = None
    keyfile: str | None = None
    #: false accepts any certificate and host name (still encrypted): test brokers only
    verify: bool = True
    #: the name the certificate must carry, when it is not the host connected to (an IP address)
    server_hostname: str | None = None


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
    # production connections (issue 24): None is plain TCP; true or a block is TLS (amqps)
    ssl: TLSSettings | None = None
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
        return [parse_address(entry, self.port) for entry in self.hosts]


#: what `redis.ssl_cert_reqs` accepts (redis-py's names)
CERT_REQS = ("none", "optional", "required")
#: the schemes `redis.url` accepts (rediss:// is TLS)
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisSettings:
    """The `redis` block as the state store reads it: where the task state lives, and how to
    log in there. guillotina.contrib.redis reads `host` and `port` only; the state store, its
    pipelined connection, its listener and the Sentinel path read all of these. Other keys of
    the block (guillotina's `pool`, `cluster_mode`) are left to guillotina."""

    host: str = "localhost"
    port: int = 6379
    db: int = 0
    #: an ACL user (Redis 6+); None logs in as `default` with `password` alone
    username: str | None = None
    password: str | None = field(default=None, repr=False, metadata={NON_EMPTY: True})
    #: one URL instead: redis://[[user]:password@]host[:port][/db], rediss:// for TLS. What it
    #: names wins over the settings above; it may hold a password, so it is a secret too
    url: str | None = field(default=None, repr=False, metadata={NON_EMPTY: True})
    ssl: bool = False
    #: the CA bundle the server's certificate must chain to (None: the system's CAs)
    ssl_ca_certs: str | None = None
    #: a client certificate and its key, for servers that require one (tls-auth-clients)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: "required" (certificate and host name checked), "optional" or "none"
    ssl_cert_reqs: str = "required"
    # Redis Sentinel: "host:port" of each Sentinel, and the master they watch
    sentinels: tuple[str, ...] = ()
    master_name: str = "mymaster"

    @property
    def uses_tls(self) -> bool:
        return self.ssl or (self.url or "").startswith("rediss://")

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [parse_address(entry, None, "redis.sentinels") for entry in self.sentinels]


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


_last_redis: tuple[dict, RedisSettings] | None = None


def get_redis_settings() -> RedisSettings:
    """The `redis` block, read and checked (InvalidSettings naming the setting, never a secret)."""
    global _last_redis
    block = app_settings.get("redis")
    if block is None:
        block = {}
    last = _last_redis
    if last is not None and last[0] == block:
        return last[1]
    settings = _checked_redis(_read_block(RedisSettings, block, ("redis",)))
    _last_redis = (copy.deepcopy(block), settings)
    return settings


def _checked_redis(settings: RedisSettings) -> RedisSettings:
    if settings.ssl_cert_reqs not in CERT_REQS:
        raise InvalidSettings(
            f"redis.ssl_cert_reqs must be one of {CERT_REQS}, not {settings.ssl_cert_reqs!r}"
        )
    scheme = (settings.url or "").partition("://")[0]
    if settings.url is not None and scheme not in REDIS_SCHEMES:
        # the URL itself is never shown: it may hold the password
        raise InvalidSettings(f"redis.url must start with redis://, rediss:// or unix://, not {scheme!r}")
    settings.sentinel_addresses()  # raises on a bad entry
    return settings


def _checked(settings: AMQPSettings) -> AMQPSettings:
    """What types alone cannot say: valid hosts, a known queue type (quorum queues have names of
    their own: RabbitMQ refuses to re-declare a queue with other arguments)."""
    for entry in settings.hosts:
        parse_address(entry, settings.port)  # raises on a bad entry
    if settings.queue_type not in QUEUE_TYPES:
        raise InvalidSettings(f"amqp.queue_type must be one of {QUEUE_TYPES}, not {settings.queue_type!r}")
    if settings.queue_type == "quorum":
        return dataclasses.replace(settings, queue=settings.queue + QUORUM_SUFFIX)
    return settings


def parse_address(entry: str, default_port: int | None, setting: str = "amqp.hosts") -> tuple[str, int]:
    """("host", port) of "host:port"; a bare "host" gets `default_port` unless it is None."""
    if ":" in entry or default_port is None:
        host, _, port = entry.rpartition(":")
    else:
        host, port = entry, str(default_port)
    if not host or not port.isdigit():
        raise InvalidSettings(f'{setting}: {entry!r} is not "host:port"')
    return host, int(port)


def _read_setting(f: Any, value: Any, path: tuple[str, ...], kind: Any = None) -> Any:
    kind = kind or _TYPES[f.name]
    if isinstance(kind, type) and is_dataclass(kind):
        return _read_block(kind, value, path)
    switched = _switched_block(kind)
    if switched is not None:
        return _read_switched_block(switched, value, path)
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


def _switched_block(kind: Any) -> type | None:
    """The block type of a setting that is either off (None) or a block (`amqp.ssl`)."""
    if not _is_optional(kind):
        return None
    others = [k for k in get_args(kind) if k is not type(None)]
    if len(others) == 1 and isinstance(others[0], type) and is_dataclass(others[0]):
        return others[0]
    return None


def _read_switched_block(kind: type, value: Any, path: tuple[str, ...]) -> Any:
    """None, false or "false" -> None (off); true or "true" -> the block's defaults; a block
    (a JSON object as text) -> the block, each of its settings read as its type."""
    if isinstance(value, str) and value.strip().lower() in (*_NONE_WORDS, *_BOOL_WORDS):
        value = _BOOL_WORDS.get(value.strip().lower())
    if value is None or value is False:
        return None
    if value is True:
        return kind()
    return _read_block(kind, value, path)


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
    return InvalidSettings(f"{setting_name(path)} {exc}, not {shown}")


def setting_name(path: tuple[str, ...]) -> str:
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
