"""Periodic tasks (docs/design.md#periodic-tasks): `@periodic(cron="*/5 * * * *")` or `@periodic(every=60)`.

Fired by the workers themselves, no extra process: every worker wakes at each
fire time and tries to claim the period in the state manager (a Redis `SET NX`
under `<prefix>meta:periodic:<name>:<period>`); the one that wins schedules an
ordinary task (state, REST, retries) with the id `periodic:<name>:<period>`.
So a period fires once however many workers run, and is not skipped while one
lives: a worker that wakes late still fires it within MISFIRE_GRACE seconds.
Cron expressions are read in UTC by croniter.
"""

import asyncio
import inspect
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from guillotina_amqp import registry

logger = logging.getLogger("guillotina_amqp")

#: how late (seconds) a worker may still fire a period; shorter periods: their own length
MISFIRE_GRACE = 60.0
#: how long a claimed period's key outlives its grace (clocks of workers differ a little)
CLAIM_MARGIN = 60.0
#: the longest a firer sleeps before looking again (clock jumps, a failed claim)
MAX_SLEEP = 30.0
RETRY_PAUSE = 1.0


class Schedule:
    """When a periodic task fires: `every` seconds (from the epoch), or a cron expression (UTC)."""

    def __init__(self, name: str, cron: str | None = None, every: float | None = None) -> None:
        if (cron is None) == (every is None):
            raise ValueError(f"periodic task {name}: give exactly one of cron= or every=")
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 < every < math.inf
        ):
            raise ValueError(
                f"periodic task {name}: every must be a positive number of seconds, not {every!r}"
            )
        if cron is not None and (not isinstance(cron, str) or not _croniter().is_valid(cron)):
            raise ValueError(f"periodic task {name}: invalid cron expression {cron!r}")
        self.cron, self.every = cron, every

    def latest(self, now: float) -> float:
        """The last fire time at or before `now` (epoch seconds)."""
        if self.every is not None:
            return math.floor(now / self.every) * self.every
        return float(_croniter()(self.cron, _utc(now + 1e-6)).get_prev(float))

    def following(self, when: float) -> float:
        """The first fire time after `when`."""
        if self.every is not None:
            return (math.floor(when / self.every) + 1) * self.every
        return float(_croniter()(self.cron, _utc(when)).get_next(float))

    def grace(self, fire: float) -> float:
        """How long after `fire` a worker may still fire it."""
        return min(MISFIRE_GRACE, self.following(fire) - fire)


def _croniter() -> Any:
    """croniter, imported on first use: most processes never read a cron expression (≈ 13 ms)."""
    from croniter import croniter

    return croniter


def _utc(when: float) -> datetime:
    return datetime.fromtimestamp(when, timezone.utc)


@dataclass(frozen=True)
class PeriodicTask:
    name: str
    definition: Any  # the TaskDefinition that schedules it
    schedule: Schedule


_periodic: dict[str, PeriodicTask] = {}


def periodic(
    func: Callable[..., Any] | None = None,
    *,
    cron: str | None = None,
    every: float | None = None,
    **options: Any,
) -> Any:
    """`@periodic(cron=...)` or `@periodic(every=seconds)` on a task taking no arguments.

    Returns its task definition (`await f()` also schedules it by hand); `options` are
    those of `@task`. ValueError naming the task for a bad schedule or a function that
    needs arguments.
    """
    if func is None:
        return lambda f: periodic(f, cron=cron, every=every, **options)
    from guillotina_amqp.decorators import TaskDefinition

    name = registry.dotted_name(func)
    schedule = Schedule(name, cron, every)
    try:
        inspect.signature(func).bind()
    except TypeError:
        raise ValueError(f"periodic task {name}: it is called without arguments, but needs some") from None
    definition = TaskDefinition(func, **options)
    _periodic[name] = PeriodicTask(name, definition, schedule)
    return definition


def registered() -> list[PeriodicTask]:
    """The periodic tasks declared in this process (by the applications it loaded)."""
    return list(_periodic.values())


def unregister(name: str) -> None:
    """Fire `name` no more (tests; applications declare theirs once, at import)."""
    _periodic.pop(name, None)


def task_id(name: str, period: int) -> str:
    return f"periodic:{name}:{period}"


class Firer:
    """A worker's share of firing periodic tasks: owned and cancelled by the worker."""

    def __init__(self, tasks: list[PeriodicTask], state_manager: Any, worker_id: str) -> None:
        self.tasks = tasks
        self.state_manager = state_manager
        self.worker_id = worker_id
        self.fired = 0  # periods this worker fired
        self._tried: dict[str, float] = {}  # name -> the last period we tried

    async def run(self) -> None:
        while True:
            pause = await self.fire_due(time.time())
            await asyncio.sleep(pause)

    async def fire_due(self, now: float) -> float:
        """Fire every task whose current period nobody fired yet; the seconds until the next."""
        pause = MAX_SLEEP
        for entry in self.tasks:
            fire = entry.schedule.latest(now)
            if self._tried.get(entry.name) != fire and now - fire <= entry.schedule.grace(fire):
                try:
                    await self._fire(entry, fire)
                    self._tried[entry.name] = fire
                except Exception:
                    logger.exception("Periodic task %s: could not fire its period %s", entry.name, fire)
                    pause = RETRY_PAUSE
            pause = min(pause, entry.schedule.following(now) - now)
        return max(pause, 0.0) + 0.001  # wake just after the boundary, not just before

    async def _fire(self, entry: PeriodicTask, fire: float) -> None:
        period = int(fire)
        ttl = entry.schedule.grace(fire) + CLAIM_MARGIN
        token = f"{self.worker_id}:{uuid.uuid4().hex}"
        if not await self.state_manager.claim_period(entry.name, period, ttl, token):
            return
        try:
            await entry.definition.schedule(_task_id=task_id(entry.name, period), _request=None)
        except BaseException:
            await self.state_manager.release_period(entry.name, period)  # another worker may fire it
            raise
        self.fired += 1
        logger.info("Periodic task %s fired for %s", entry.name, _utc(fire).isoformat())
