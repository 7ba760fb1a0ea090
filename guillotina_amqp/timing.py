"""When a task may start (docs/tasks.md): `_countdown` / `_eta`, held in the broker's delay tiers.

A waiting task sits in the longest delay tier that does not overshoot its start, comes
back to the main queue, and is sent into a shorter tier again until less than the
shortest tier (0.1 s) remains, which the worker sleeps out: it never starts early, starts
soon after its time, and waits in RabbitMQ, not in a worker's memory, so restarts neither
lose nor advance it.
"""

import asyncio
import math
import time
from datetime import datetime, timezone
from typing import Any

from guillotina_amqp import names


def start_at(countdown: Any = None, eta: Any = None) -> float | None:
    """The epoch second a task may start, from `_countdown` (seconds) or `_eta` (a datetime,
    naive = UTC, or an epoch timestamp); None for now. ValueError naming a bad one."""
    if countdown is not None and eta is not None:
        raise ValueError("give _countdown or _eta, not both")
    if countdown is not None:
        return time.time() + _seconds(countdown, "_countdown", minimum=0)
    if eta is None:
        return None
    if isinstance(eta, datetime):
        return (eta if eta.tzinfo else eta.replace(tzinfo=timezone.utc)).timestamp()
    return _seconds(eta, "_eta", minimum=-math.inf)


def _seconds(value: Any, name: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < math.inf:
        raise ValueError(
            f"{name} must be a number of seconds{' >= 0' if minimum == 0 else ''}, not {value!r}"[:120]
        )
    return float(value)


def wait_ms(eta: float | None, now: float | None = None) -> int | None:
    """The delay tier to hold a task until `eta` in; None when it may start now."""
    if eta is None:
        return None
    remaining_ms = (eta - (time.time() if now is None else now)) * 1000
    return names.delay_tier_floor_ms(remaining_ms)


async def until(eta: float | None) -> None:
    """Sleep out what is left before `eta`: less than the shortest tier (the worker holds it)."""
    if eta is not None and eta > time.time():
        await asyncio.sleep(eta - time.time())


def check_eta(value: Any, name: str) -> None:
    """A message's `eta`: absent or a finite epoch second; ValueError otherwise."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be an epoch second, not {str(value)[:40]!r}")
