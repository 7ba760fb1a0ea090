"""The `amqp` settings block (SPEC §2) read as one typed object."""

from dataclasses import dataclass, field
from typing import Any

from guillotina import app_settings

from guillotina_amqp.exceptions import AMQPConfigurationNotFoundError

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
    "max_message_bytes": 1048576,
    "max_eventlog": 1000,
}


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
    max_message_bytes: int = 1048576
    max_eventlog: int = 1000
    redis_prefix_key: str = "amqpjobs-"


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
    prefix = app_settings.get("redis_prefix_key", "amqpjobs-")
    return AMQPSettings(redis_prefix_key=prefix, **values)
