"""The `amqp` settings block (SPEC §2) read as one typed object."""

from dataclasses import dataclass, field
from typing import Any

from guillotina import app_settings

from guillotina_amqp.exceptions import AMQPConfigurationNotFoundError, InvalidSettings

DEFAULTS: dict[str, Any] = {
    "connection_factory": "aioamqp.connect",
    "host": "localhost",
    "port": 5672,
    "login": "guest",
    "password": "guest",
    "vhost": "/",
    "heartbeat": 120,
    "exchange": "guillotina",
    "queue": "guillotina",
    "persistent_manager": "memory",
    "max_running_tasks": 20,
    "state_ttl": 86400,
    "max_task_retries": 5,
    "delayed_ttl_ms": 120000,
    "errored_ttl_ms": 604800000,
    "beaconttl": 30,
    # beyond the original (SPEC §6, §9)
    "noop_after": 200,
    "kill_after": 300,
    "shutdown_timeout": 30,
    "update_status_interval": 20,
    "lock_ttl": 60,
    "allowed_tasks": None,
    "signing_key": None,
    "previous_signing_keys": [],
    # beyond one machine (SPEC §14)
    "hosts": [],
    "queue_type": "classic",
}

#: queue types `amqp.queue_type` accepts
QUEUE_TYPES = ("classic", "quorum")
#: quorum queues get names of their own: RabbitMQ refuses to re-declare a queue with other arguments
QUORUM_SUFFIX = "-quorum"


@dataclass(frozen=True)
class AMQPSettings:
    """Every setting of the `amqp` block, defaults filled in."""

    connection_factory: str
    host: str
    port: int
    login: str
    password: str = field(repr=False)
    vhost: str
    heartbeat: int
    exchange: str
    queue: str
    persistent_manager: str
    max_running_tasks: int
    state_ttl: int
    max_task_retries: int | None
    delayed_ttl_ms: int
    errored_ttl_ms: int
    beaconttl: float
    noop_after: float
    kill_after: float
    shutdown_timeout: float
    update_status_interval: float
    lock_ttl: int
    allowed_tasks: tuple[str, ...] | None
    signing_key: str | None = field(repr=False)
    previous_signing_keys: tuple[str, ...] = field(repr=False)
    hosts: tuple[str, ...] = ()
    queue_type: str = "classic"
    redis_prefix_key: str = "amqpjobs-"

    def addresses(self) -> list[tuple[str, int]]:
        """The brokers to connect to, in order: `hosts` ("host:port", the port defaulting to
        `port`) or else `host`:`port`."""
        if not self.hosts:
            return [(self.host, self.port)]
        return [_address(entry, self.port) for entry in self.hosts]


def is_configured() -> bool:
    return isinstance(app_settings.get("amqp"), dict)


def get_settings() -> AMQPSettings:
    """The current `amqp` settings; raise AMQPConfigurationNotFoundError without a block."""
    block = app_settings.get("amqp")
    if not isinstance(block, dict):
        raise AMQPConfigurationNotFoundError("no 'amqp' block in the application settings")
    values = {**DEFAULTS, **{k: v for k, v in block.items() if k in DEFAULTS}}
    allowed = values["allowed_tasks"]
    values["allowed_tasks"] = tuple(allowed) if allowed is not None else None
    values["previous_signing_keys"] = tuple(values["previous_signing_keys"] or ())
    values["port"] = int(values["port"])
    values["max_running_tasks"] = int(values["max_running_tasks"])
    values["hosts"] = _hosts(values["hosts"], values["port"])
    if values["queue_type"] not in QUEUE_TYPES:
        raise InvalidSettings(f"amqp.queue_type must be one of {QUEUE_TYPES}, not {values['queue_type']!r}")
    if values["queue_type"] == "quorum":
        values["queue"] += QUORUM_SUFFIX
    prefix = app_settings.get("redis_prefix_key", "amqpjobs-")
    return AMQPSettings(redis_prefix_key=prefix, **values)


def _hosts(hosts: Any, port: int) -> tuple[str, ...]:
    if isinstance(hosts, str) or not all(isinstance(entry, str) for entry in hosts or ()):
        raise InvalidSettings(f'amqp.hosts must be a list of "host:port" strings, not {hosts!r}')
    for entry in hosts or ():
        _address(entry, port)  # raises on a bad entry
    return tuple(hosts or ())


def _address(entry: str, default_port: int) -> tuple[str, int]:
    host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", str(default_port))
    if not host or not port.isdigit():
        raise InvalidSettings(f'amqp.hosts: {entry!r} is not "host:port"')
    return host, int(port)
