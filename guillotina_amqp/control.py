"""Task control (docs/tasks.md): the checks of the options `timeout`, `max_retries` and `priority`,
and the retry delay.

Each check is given how the caller spelled the option (`_timeout` on add_task, `timeout` on
`@task`, `'timeout'` in a message): the options themselves are declared in options.TaskOptions.
"""

import math
import random
from typing import Any

from guillotina_amqp import names
from guillotina_amqp.settings import AMQPSettings


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """`value` as a time limit in seconds: None or a positive finite number; else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {_shown(value)}")
    return float(value)


def check_max_retries(value: Any, name: str = "max_retries") -> int | None:
    """`value` as a retry count: None or an integer >= 0; else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 or None, not {_shown(value)}")
    return value


def check_priority(value: Any, name: str = "priority") -> int | None:
    """`value` as a task priority: None or an integer from 0 (lowest) to 9; else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= names.MAX_PRIORITY:
        raise ValueError(
            f"{name} must be an integer from 0 to {names.MAX_PRIORITY} or None, not {_shown(value)}"
        )
    return value


def _shown(value: Any) -> str:
    """A bad value as an error message shows it (a hostile message's value may be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."


#: The most retries the exponent grows by (the cap is reached long before)
_MAX_DOUBLINGS = 40


def retry_delay_ms(settings: AMQPSettings, retries: int, requested: float | None = None) -> int | None:
    """Milliseconds before run `retries + 2` of a failed task; None = the delay queue's own
    `delayed_ttl_ms` (the original's fixed delay, the default without `retry_backoff`).

    `requested`: the seconds a task asked for (`Retry(delay=...)`). With
    `amqp.retry_backoff` the delay doubles from `delayed_ttl_ms` with each retry,
    is capped by `retry_backoff_max_ms`, and is drawn at random from its upper
    half, so tasks that failed together do not all come back together.
    """
    if requested is not None:
        return round(requested * 1000)
    if not settings.retry_backoff:
        return None
    ceiling = min(settings.retry_backoff_max_ms, settings.delayed_ttl_ms * 2 ** min(retries, _MAX_DOUBLINGS))
    return round(ceiling * random.uniform(0.5, 1.0))
