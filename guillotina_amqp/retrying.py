"""Trying again: the one helper behind every path that reconnects or retries.

A `Backoff` says how long to pause before each retry and when to stop; `retry`
awaits a call until it works, pausing between attempts. The policies in use are
named where they apply (`connection.RECONNECT`, `state/redis.REDIS_RETRY`,
`publishing.Publisher.publish`, the worker's gate, the state listener).
"""

import asyncio
import dataclasses
import logging
import random
import time
import traceback
from typing import Awaitable, Callable, TypeVar

logger = logging.getLogger("guillotina_amqp")
T = TypeVar("T")

#: told of a failed attempt that is retried: (the error, attempts so far, the pause before the next)
OnRetry = Callable[[Exception, int, float], None]


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Pauses of `first` seconds, doubling with each retry (unless not `doubling`) up to `cap`;
    with `jitter`, each drawn at random between 0 and that (full jitter). Retrying stops after
    `max_tries` attempts or once `max_time` seconds have passed (None: no limit)."""

    first: float
    doubling: bool = True
    cap: float | None = None
    jitter: bool = False
    max_tries: int | None = None
    max_time: float | None = None

    def pause(self, tries: int) -> float:
        """The pause after the `tries`-th failed attempt."""
        seconds = self.first * 2 ** (tries - 1) if self.doubling else self.first
        if self.cap is not None:
            seconds = min(seconds, self.cap)
        return random.uniform(0, seconds) if self.jitter else seconds

    def exhausted(self, tries: int, elapsed: float) -> bool:
        return (self.max_tries is not None and tries >= self.max_tries) or (
            self.max_time is not None and elapsed >= self.max_time
        )


class Attempts:
    """One run of retries: how many attempts, since when. Shared by two `retry` calls, they
    count against the same limits."""

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.tries = 0
        self.started = time.monotonic()

    def failed(self, elapsed: float) -> float | None:
        """The pause before the next attempt, or None once the limits are reached."""
        if self.policy.exhausted(self.tries, elapsed):
            return None
        pause = self.policy.pause(self.tries)
        if self.policy.max_time is not None:  # never past the time allotted
            pause = min(pause, self.policy.max_time - elapsed)
        return pause


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: Backoff | Attempts,
    errors: tuple[type[Exception], ...],
    giveup: Callable[[Exception], bool] = lambda exc: False,
    on_retry: OnRetry | None = None,
    on_giveup: Callable[[Exception, int], None] | None = None,
    name: str | None = None,
) -> T:
    """`await call()` until it returns, retrying on `errors` with `policy`'s pauses; the last
    error is raised once the limits are reached or `giveup(error)`. A factory, not an
    awaitable: each attempt starts anew. Without `on_retry`/`on_giveup`, each retry is
    logged at INFO ("Backing off") and the last failure at ERROR ("Giving up"), naming the
    call (or `name`)."""
    attempts = policy if isinstance(policy, Attempts) else Attempts(policy)
    while True:
        attempts.tries += 1
        elapsed = time.monotonic() - attempts.started
        try:
            return await call()
        except errors as exc:
            pause = None if giveup(exc) else attempts.failed(elapsed)
            if pause is None:
                (on_giveup or log_giveup(name or _name(call)))(exc, attempts.tries)
                raise
            (on_retry or _log_backoff(name or _name(call)))(exc, attempts.tries, pause)
            await asyncio.sleep(pause)


def silently(exc: Exception, tries: int) -> None:
    """An `on_giveup` that logs nothing: the caller reports the error it raises."""


def _name(call: Callable) -> str:
    return getattr(call, "__name__", repr(call))


def _log_backoff(name: str) -> OnRetry:
    def log(exc: Exception, tries: int, pause: float) -> None:
        logger.info("Backing off %s(...) for %.1fs (%s)", name, pause, _exception_line(exc))

    return log


def log_giveup(name: str) -> Callable[[Exception, int], None]:
    """The default `on_giveup`: the last failure logged at ERROR, naming the call."""

    def log(exc: Exception, tries: int) -> None:
        logger.error("Giving up %s(...) after %d tries (%s)", name, tries, _exception_line(exc))

    return log


def _exception_line(exc: Exception) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].rstrip("\n")
