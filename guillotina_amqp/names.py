"""Queue names, queue arguments and state keys, derived in one place.

RabbitMQ refuses to re-declare a queue with other arguments (PRECONDITION_FAILED),
so the arguments here are exactly those of SPEC §3 and never change.
"""

import uuid
from typing import Any

from guillotina_amqp.settings import AMQPSettings

BEACON_EXCHANGE = "beacon"


def delay_queue(queue: str) -> str:
    return f"{queue}-delay"


def error_queue(queue: str) -> str:
    return f"{queue}-error"


def topology(settings: AMQPSettings) -> dict[str, dict[str, Any]]:
    """Queue name -> declaration arguments for the main, delay and error queues."""
    queue, exchange = settings.queue, settings.exchange
    return {
        queue: {
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": error_queue(queue),
        },
        delay_queue(queue): {
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": queue,
            "x-message-ttl": settings.delayed_ttl_ms,
        },
        error_queue(queue): {"x-message-ttl": settings.errored_ttl_ms},
    }


def beacon_queues(uid: str) -> tuple[str, str]:
    """(beacon queue, beacon delay queue) of one connection."""
    return f"beacon-{uid}", f"beacon-delay-{uid}"


def task_id_prefix(db_id: str | None, container_id: str | None) -> str:
    """Prefix shared by every task scheduled inside one container."""
    return f"task:{db_id}-{container_id}-"


def in_container(task_id: str, prefix: str) -> bool:
    """Whether `task_id` was made by task_id_prefix(...) + uuid4 for this very container.

    A bare prefix test is not enough: container "a" must not see the tasks of "a-b".
    """
    if not task_id.startswith(prefix):
        return False
    try:
        return str(uuid.UUID(task_id[len(prefix) :])) == task_id[len(prefix) :]
    except ValueError:
        return False


# Redis keys: the state of a task lives at <prefix><task_id>; bookkeeping keys
# use a ':' after a word no task id starts with, so list() can tell them apart.
def state_key(prefix: str, task_id: str) -> str:
    return f"{prefix}{task_id}"


def lock_key(prefix: str, task_id: str) -> str:
    return f"{prefix}lock:{task_id}"


def cancel_key(prefix: str) -> str:
    return f"{prefix}cancel"


def done_channel(prefix: str, task_id: str) -> str:
    """Pub/sub channel told whenever the task's status changes."""
    return f"{prefix}changed:{task_id}"


# Operations bookkeeping (SPEC §13) lives under `<prefix>meta:`, a word no task id can start with.
META = "meta:"
#: task states a container's index keeps a sorted set for
INDEXED_STATUSES = ("scheduled", "running", "finished", "errored", "canceled")
DONE_INDEXED = INDEXED_STATUSES[2:]
UUID_LENGTH = len(str(uuid.UUID(int=0)))


def container_of(task_id: str) -> str | None:
    """The task_id_prefix(...) a container task id was made with; None for other ids."""
    prefix = task_id[:-UUID_LENGTH]
    if task_id.startswith("task:") and in_container(task_id, prefix):
        return prefix
    return None


def index_key(prefix: str, container: str, status: str | None = None) -> str:
    """Sorted set of a container's task ids: all of them by creation time, or one status's by
    the time they reached it."""
    return f"{prefix}{META}index:{status or 'all'}:{container}"


def times_key(prefix: str, task_id: str) -> str:
    """Hash of when a task was created, started and ended (epoch seconds)."""
    return f"{prefix}{META}times:{task_id}"


def worker_key(prefix: str, worker_id: str) -> str:
    """What a live worker announces about itself (expires unless refreshed)."""
    return f"{prefix}{META}workers:{worker_id}"


def workers_key(prefix: str) -> str:
    """Sorted set of announced worker ids scored by when their announcement expires."""
    return f"{prefix}{META}workers"


def changed_pattern(prefix: str, container: str) -> str:
    """Pub/sub pattern matching done_channel(...) of every task of one container."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in container)
    return f"{prefix}changed:{escaped}*"
