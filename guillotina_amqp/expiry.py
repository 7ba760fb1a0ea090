"""Task expiry (docs/tasks.md#expiry): a task not started by its deadline never runs.

`_expires` (seconds from now, or a datetime) is turned into an absolute deadline
at the call; it travels as the message field `expires` (epoch seconds). The worker
decides at claim time: a delivery past its deadline — the first run or a retry —
ends `canceled` with an `error` saying it expired.
"""

import math
import time
from datetime import datetime, timezone
from typing import Any

#: The message field holding the deadline (seconds since the epoch, or null).
FIELD = "expires"


def deadline(expires: Any, now: float | None = None) -> float | None:
    """The epoch second `expires` ends at: None stays None, a number is seconds from `now`,
    a datetime is taken as it is (a naive one as UTC, like `_eta`).

    ValueError for a negative or non-finite number and for anything else.
    """
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return (expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not 0 <= expires < math.inf:
        raise ValueError(f"_expires must be seconds >= 0 or a datetime, not {_shown(expires)}")
    return (time.time() if now is None else now) + expires


def check_field(value: Any, name: str) -> None:
    """A message's `expires` field: absent or a finite epoch second; ValueError otherwise."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ):
        raise ValueError(f"{name} is not a number of seconds since the epoch: {_shown(value)}")


def expired(data: dict, now: float | None = None) -> str | None:
    """The `error` of a task whose deadline passed before it could start; None if it may run."""
    when = data.get(FIELD)
    if when is None or when > (time.time() if now is None else now):
        return None
    stamp = datetime.fromtimestamp(when, timezone.utc).isoformat()
    return f"expired: not started by {stamp} (_expires)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."
