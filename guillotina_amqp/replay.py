"""Replays of signed messages: each carries the time it was issued, inside its signed body.

A signature proves who made a message, not when: a copy taken off the broker verifies for
ever. Once its task's state has expired nothing else remembers the run, so the copy would
run again. A signed message is therefore valid for `amqp.replay_window` seconds (default:
state_ttl) after it was issued, plus every wait it asked for itself — its countdown or eta,
and its retries (each one's delay and run time, as many as its retry budget allows): a task
waiting for its start, or retried as it asked, is never mistaken for a replay.

The check reads nothing but the message and the worker's clock: a message whose state Redis
lost still runs. A signed message without `issued` was made before this check existed and is
taken as it is (rotate the signing key once those are gone, and none is left).
"""

import math
import time
from typing import Any

from guillotina_amqp.exceptions import InvalidMessage
from guillotina_amqp.settings import AMQPSettings

ISSUED = "issued"


def stamp(message: dict[str, Any], settings: AMQPSettings) -> dict[str, Any]:
    """`message` with the time it is issued now, when messages are signed (an unsigned one
    could carry any time at all)."""
    if settings.signing_key:
        message[ISSUED] = time.time()
    return message


def check_fresh(
    message: dict[str, Any], settings: AMQPSettings, task_id: str | None = None, now: float | None = None
) -> None:
    """InvalidMessage for a signed message issued longer ago than it may live (max_age)."""
    if not settings.signing_key or message.get(ISSUED) is None:
        return
    issued = message[ISSUED]
    if isinstance(issued, bool) or not isinstance(issued, (int, float)) or not math.isfinite(issued):
        raise InvalidMessage(f"'{ISSUED}' must be an epoch second, not {str(issued)[:40]!r}", task_id)
    limit = max_age(message, settings)
    age = (time.time() if now is None else now) - issued
    if limit is not None and age > limit:
        raise InvalidMessage(
            f"replay refused: issued {age:.0f}s ago, more than the {limit:.0f}s a message with its "
            "countdown and retries may live (amqp.replay_window)",
            task_id,
        )


def max_age(message: dict[str, Any], settings: AMQPSettings) -> float | None:
    """Seconds after its issue a message may still be delivered; None: no bound (retried for ever)."""
    retries = message.get("max_retries")
    retries = settings.max_task_retries if retries is None else retries
    if retries is None:
        return None
    window = settings.state_ttl if settings.replay_window is None else settings.replay_window
    waited = max(0.0, (message.get("eta") or 0) - message[ISSUED])
    # each run may last its timeout, then wait the longest delay before the next one
    delay_ms = settings.retry_backoff_max_ms if settings.retry_backoff else settings.delayed_ttl_ms
    run = message.get("timeout") or settings.task_timeout or 0
    return window + waited + (retries + 1) * (delay_ms / 1000 + run)
