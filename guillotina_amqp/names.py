"""Queue names, queue arguments and state keys, derived in one place.

RabbitMQ refuses to re-declare a queue with other arguments (PRECONDITION_FAILED),
so the arguments here are exactly the original's and never change; quorum queues
(`amqp.queue_type: quorum`) add theirs under names of their own (settings.QUORUM_SUFFIX).
"""

import bisect
import math
import string
import uuid
from typing import Any

from guillotina_amqp.settings import AMQPSettings

BEACON_EXCHANGE = "beacon"

#: Object tasks travel as one of these wrappers with the callable's name as first arg;
#: the wrappers resolve (and check) that callable themselves, so they are always allowed.
OBJECT_TASK_WRAPPERS = frozenset(
    {"guillotina_amqp.utils._run_object_task", "guillotina_amqp.utils._yield_object_task"}
)


def task_name(func: str, args: list | tuple) -> str:
    """A task's function as logs, metrics and events name it (object tasks by their callable)."""
    if func in OBJECT_TASK_WRAPPERS and args:
        # "run_object_task/app.f" or "yield_object_task/app.f", as the original named them
        return f"{func.rpartition('.')[2].lstrip('_')}/{args[0]}"
    return func


def delay_queue(queue: str) -> str:
    return f"{queue}-delay"


def error_queue(queue: str) -> str:
    return f"{queue}-error"


#: Delay tiers (docs/design.md#queues): fixed-TTL queues of 100 ms * 2^(k/4), each about 19% longer than the
#: one before, up to about 19 days. A per-message TTL only expires at a queue's head, so a
#: delay needs a queue whose every message waits as long; the original's queues stay as they are.
DELAY_TIERS_MS = tuple(math.ceil(100 * 2 ** (k / 4)) for k in range(97))
#: How long an unused tier queue outlives the last message put in it (RabbitMQ's x-expires)
TIER_EXPIRES_AFTER_MS = 60000


def delay_tier_ms(delay_ms: float) -> int:
    """The TTL of the shortest delay tier holding a message at least `delay_ms` (capped)."""
    index = bisect.bisect_left(DELAY_TIERS_MS, delay_ms)
    return DELAY_TIERS_MS[min(index, len(DELAY_TIERS_MS) - 1)]


def delay_tier_floor_ms(delay_ms: float) -> int | None:
    """The TTL of the longest delay tier not past `delay_ms`; None below the shortest tier."""
    index = bisect.bisect_right(DELAY_TIERS_MS, delay_ms)
    return DELAY_TIERS_MS[index - 1] if index else None


def delay_tier_queue(queue: str, ttl_ms: int, quorum: bool = False) -> str:
    # a quorum tier is named apart: redeclaring a classic tier of the same name as a quorum
    # queue would fail (406) while workers of both kinds run during the switch
    return f"{queue}-{'q' if quorum else ''}delay-{ttl_ms}ms"


def delay_tier(
    settings: AMQPSettings, delay_ms: float, queue: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(name, declaration arguments) of the tier queue that delays a message `delay_ms` or a
    little more, then dead-letters it back to `queue` (default: amqp.queue). Tiers are
    declared on use and expire once unused, so their number never grows on the broker."""
    ttl = delay_tier_ms(delay_ms)
    queue = queue or settings.queue
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": settings.exchange,
        "x-dead-letter-routing-key": queue,
        "x-message-ttl": ttl,
        # declared again before every use: idle for longer, its last message is long gone
        "x-expires": 2 * ttl + TIER_EXPIRES_AFTER_MS,
    }
    quorum = settings.queue_type == "quorum"
    if quorum:  # a countdown or a backed-off retry is replicated too
        arguments |= _quorum_arguments(arguments)
    return delay_tier_queue(queue, ttl, quorum), arguments


#: Priorities (docs/tasks.md#priorities): tasks given one wait in `<queue>-priority`, declared with
#: x-max-priority (the original's queues keep their arguments), 0 lowest, 9 highest.
PRIORITY_SUFFIX = "-priority"
MAX_PRIORITY = 9


def priority_queue(queue: str) -> str:
    """The queue where the tasks of `queue` that were given a priority wait."""
    return f"{queue}{PRIORITY_SUFFIX}"


def is_priority_queue(queue: str) -> bool:
    return queue.endswith(PRIORITY_SUFFIX)


def priority_queues(settings: AMQPSettings, queues: list[str]) -> list[str]:
    """The priority queues a worker of `queues` consumes too; none with quorum queues, which
    RabbitMQ 3.x declares with no x-max-priority (add_task refuses `_priority` then)."""
    if settings.queue_type == "quorum":
        return []
    return [priority_queue(queue) for queue in queues]


def topology(settings: AMQPSettings, queue: str | None = None) -> dict[str, dict[str, Any]]:
    """Queue name -> declaration arguments for the main, delay and error queues of `queue`
    (default: amqp.queue); a named queue gets the same arguments as the default one, a
    priority queue (priority_queue(...)) x-max-priority besides."""
    queue, exchange = queue or settings.queue, settings.exchange
    main: dict[str, Any] = {
        "x-dead-letter-exchange": exchange,
        "x-dead-letter-routing-key": error_queue(queue),
    }
    if is_priority_queue(queue):
        main["x-max-priority"] = MAX_PRIORITY
    queues: dict[str, dict[str, Any]] = {
        queue: main,
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
    """Replicated queues (docs/operations.md). A queue that dead-letters does so at-least-once: a
    message leaves only once the target queue confirmed its copy (RabbitMQ 3.10+ accepts
    that strategy only with reject-publish overflow)."""
    if "x-dead-letter-exchange" not in arguments:
        return {"x-queue-type": "quorum"}
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


#: What `--queue` and `_queue=` call amqp.queue.
DEFAULT_QUEUE = "default"
#: Named queues: these characters; no "amq." prefix (RabbitMQ reserves it).
QUEUE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_.:")
#: RabbitMQ's limit is 255 bytes, and the name's priority queue and its delay tiers must fit it too.
MAX_QUEUE_NAME_LENGTH = 255 - len("-priority-delay-1661010000ms")  # fits "-quorum-qdelay-…" too


def task_queue(name: Any, settings: AMQPSettings) -> str:
    """The queue `name` designates: amqp.queue for None or "default", else `name`, checked."""
    return named_queue(name) or settings.queue


def named_queue(name: Any) -> str | None:
    """`name` checked, None for None and "default" (amqp.queue, whatever the settings call it)."""
    if name is None or name == DEFAULT_QUEUE:
        return None
    return check_queue_name(name)


def check_queue_name(name: Any) -> str:
    """`name` if it may name a queue; ValueError saying what is wrong with a name RabbitMQ
    would refuse, or one that would collide with another queue's delay or error queue."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a queue name must be a non-empty string, not {name!r}")
    if len(name.encode()) > MAX_QUEUE_NAME_LENGTH:
        raise ValueError(
            f"queue name {name[:40]!r}... is longer than {MAX_QUEUE_NAME_LENGTH} bytes "
            "(RabbitMQ's 255, less its delay tiers' suffix)"
        )
    if not QUEUE_CHARACTERS.issuperset(name):
        bad = sorted(set(name) - QUEUE_CHARACTERS)[:5]
        raise ValueError(f"queue name {name!r} has characters outside [A-Za-z0-9-_.:]: {bad}")
    if name.startswith("amq."):
        raise ValueError(f"queue name {name!r}: RabbitMQ reserves names starting with 'amq.'")
    if name.endswith(("-delay", "-error", PRIORITY_SUFFIX)) or "-delay-" in name:
        raise ValueError(f"queue name {name!r} looks like a delay, error or priority queue")
    return name


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


# Redis keys: the state of a task lives at <prefix><task_id> (where the original plugin kept it);
# bookkeeping keys start with a word no valid task id may start with, so no id can reach them.
RESERVED_IDS = frozenset({"cancel"})
RESERVED_ID_PREFIXES = ("lock:", "eventlog:", "meta:", "changed:")
#: Task ids: these characters (those of guillotina's ids, plus ":/~" and capitals), 1 to 200 of them.
TASK_ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + ".-_@$^()+= :/~")
MAX_TASK_ID_LENGTH = 200


def check_task_id(task_id: Any) -> str:
    """`task_id` if it may name a task; ValueError saying why not."""
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"a task id must be a non-empty string, not {type(task_id).__name__}")
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise ValueError(f"task id longer than {MAX_TASK_ID_LENGTH} characters")
    if not TASK_ID_CHARACTERS.issuperset(task_id):
        bad = sorted(set(task_id) - TASK_ID_CHARACTERS)[:5]
        raise ValueError(f"task id {task_id[:50]!r} has characters outside [A-Za-z0-9.-_@$^()+= :/~]: {bad}")
    if task_id in RESERVED_IDS or task_id.startswith(RESERVED_ID_PREFIXES):
        raise ValueError(f"task id {task_id!r} is reserved for bookkeeping keys")
    return task_id


def is_task_key(name: str) -> bool:
    """Whether a key name (prefix removed) can be a task's state rather than bookkeeping."""
    return name not in RESERVED_IDS and not name.startswith(RESERVED_ID_PREFIXES)


def state_key(prefix: str, task_id: str) -> str:
    return f"{prefix}{task_id}"


def eventlog_key(prefix: str, task_id: str) -> str:
    """A list of JSON `[timestamp, text]` entries, capped at amqp.max_eventlog."""
    return f"{prefix}eventlog:{task_id}"


def lock_key(prefix: str, task_id: str) -> str:
    return f"{prefix}lock:{task_id}"


def cancel_key(prefix: str) -> str:
    return f"{prefix}cancel"


def done_channel(prefix: str, task_id: str) -> str:
    """Pub/sub channel told whenever the task's status changes."""
    return f"{prefix}changed:{task_id}"


# Operations bookkeeping (docs/design.md#keys) lives under `<prefix>meta:`, a word no task id starts with.
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


def periodic_key(prefix: str, name: str, period: int) -> str:
    """Set (NX) by the one worker that fires periodic task `name` for the period starting at
    epoch second `period`."""
    return f"{prefix}meta:periodic:{name}:{period}"
