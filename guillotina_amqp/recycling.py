"""Worker recycling and load (docs/operations.md): `--max-tasks`, `--max-load` (and `--max-run-time`,
which the command times itself).

A worker that may claim no more tasks, or whose machine is too loaded, stops
consuming (its consumer is cancelled; what it holds unclaimed goes back to the
queue) and consumes again once it may. The worker owns one Gate that says whether
it should consume, given the reasons it holds.
"""

import asyncio
import logging
import os
from typing import Callable

logger = logging.getLogger("guillotina_amqp")

#: seconds between two readings of the load average (the kernel updates it every 5 s)
LOAD_INTERVAL = 5.0

MAX_TASKS = "max-tasks"
LOAD = "load"


class Quota:
    """At most `limit` claims (None: no limit). A delivery takes a place before it tries to
    claim its task and gives it back if it did not claim it, so claims never exceed `limit`."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"--max-tasks must be at least 1, not {limit}")
        self.limit = limit
        self.taken = 0
        self.claimed = 0

    def take(self) -> bool:
        if self.limit is None:
            return True
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def settle(self, claimed: bool) -> None:
        """A taken place: used by a claim, or given back."""
        if self.limit is None:
            return
        if claimed:
            self.claimed += 1
        else:
            self.taken -= 1

    @property
    def full(self) -> bool:
        """No place left to take (some may still be given back)."""
        return self.limit is not None and self.taken >= self.limit

    @property
    def done(self) -> bool:
        """`limit` tasks claimed: the worker has done its share."""
        return self.limit is not None and self.claimed >= self.limit


class Gate:
    """Whether the worker should consume: not while it holds any reason to pause."""

    def __init__(self) -> None:
        self.reasons: set[str] = set()
        self.changed = asyncio.Event()

    @property
    def open(self) -> bool:
        return not self.reasons

    def hold(self, reason: str, held: bool = True) -> None:
        """Hold the gate for `reason` (or release it with held=False)."""
        before = set(self.reasons)
        if held:
            self.reasons.add(reason)
        else:
            self.reasons.discard(reason)
        if self.reasons != before:
            self.changed.set()


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


class LoadWatch:
    """Holds the gate while the 1-minute load average is above `limit`; logs both edges."""

    def __init__(self, limit: float, on_change: Callable[[bool], None], worker_id: str) -> None:
        if not limit > 0:
            raise ValueError(f"--max-load must be a positive load average, not {limit}")
        self.limit = limit
        self.on_change = on_change
        self.worker_id = worker_id
        self.high = False
        self.readings = 0

    def check(self) -> bool:
        """Read the load now; tell `on_change` when it crossed the limit. Whether it is high."""
        load = load_average()
        self.readings += 1
        high = load > self.limit
        if high != self.high:
            self.high = high
            if high:
                logger.warning(
                    "Worker %s: load %.2f above --max-load %g: taking no tasks",
                    self.worker_id,
                    load,
                    self.limit,
                )
            else:
                logger.info(
                    "Worker %s: load %.2f back under --max-load %g: taking tasks again",
                    self.worker_id,
                    load,
                    self.limit,
                )
            self.on_change(high)
        return high

    async def run(self) -> None:
        while True:
            await asyncio.sleep(LOAD_INTERVAL)
            try:
                self.check()
            except OSError:
                logger.exception("Worker %s: cannot read the load average", self.worker_id)
