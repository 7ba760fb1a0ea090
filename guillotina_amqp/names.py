"""Queue names, queue arguments and state keys, derived in one place.

RabbitMQ refuses to re-declare a queue with other arguments (PRECONDITION_FAILED),
so the arguments here are exactly those of SPEC §3 and never change; quorum queues
(`amqp.queue_type: quorum`) add theirs under names of their own (settings.QUORUM_SUFFIX).
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
    queues: dict[str, dict[str, Any]] = {
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
    if settings.queue_type == "quorum":
        return {name: {**arguments, **_quorum_arguments(arguments)} for name, arguments in queues.items()}
    return queues


def _quorum_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Replicated queues (SPEC §14). A queue that dead-letters does so at-least-once: a
    message leaves only once the target queue confirmed its copy (RabbitMQ 3.10+ accepts
    that strategy only with reject-publish overflow)."""
    if "x-dead-letter-exchange" not in arguments:
        return {"x-queue-type": "quorum"}
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
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
