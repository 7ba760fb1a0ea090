"""Run ids: which of the runs of one task id is the latest, told by the state store's clock.

A task id reused by `add_task(..., _task_id=X)` runs again as a new run; a copy of an
earlier run (a redelivery, a retry waiting in a delay queue) must then be skipped, and a
run whose message arrives before its state was written must not be. Runs are therefore
ordered, and the order is taken from the store, never from the scheduling host: each new
run is the store's own time in nanoseconds (Redis TIME; the process clock for the memory
store), or one more than the latest run of the id if that is later — so a store whose clock
stepped back still orders the runs of an id. API hosts whose clocks differ do not matter.
An id add_task generated itself has no earlier run: its first run is the lowest (first_run).

A run is "<20 digits>-<8 hex digits>" (the hex part tells apart runs made in the same
nanosecond), compared as text. A run the store's clock could not have made yet (more than
FUTURE_MARGIN_NS ahead of it) is a forgery: its message is refused, and a stored one orders
nothing, so no message can push the runs of an id out of reach of later add_tasks.
"""

import re
import secrets

#: how far ahead of the store's clock a run may be (the clock of a Redis replica promoted after
#: a failover may be behind its master's): beyond it, a run was not made by any store
FUTURE_MARGIN_NS = 86400 * 10**9
RUN_PATTERN = re.compile(r"[0-9]{20}-[0-9a-f]{8}")
_DIGITS = 20


def check_run(run: object) -> str:
    """`run` if a message may carry it ("" is the original plugin's: no run); ValueError else."""
    if run == "" or (isinstance(run, str) and RUN_PATTERN.fullmatch(run)):
        return run  # type: ignore[return-value]
    raise ValueError(f"'run' {str(run)[:40]!r} is not a run id (20 digits, '-', 8 hex digits)")


def sequence(run: str, now_ns: int) -> int:
    """The time part of a stored run; 0 for none, for a malformed one and for one from the future."""
    if not isinstance(run, str) or not RUN_PATTERN.fullmatch(run):
        return 0
    value = int(run[:_DIGITS])
    return 0 if value > now_ns + FUTURE_MARGIN_NS else value


def next_run(now_ns: int, current: str) -> str:
    """A run after `current` (the id's latest stored run, "" if none), by the store's clock `now_ns`."""
    value = max(now_ns, sequence(current, now_ns) + 1)
    return f"{value:0{_DIGITS}d}-{secrets.token_hex(4)}"


def first_run() -> str:
    """The run of a task id nobody used before (one add_task generated): no run precedes it, so
    it is the lowest one, made without asking the store; any later run of the id follows it."""
    return f"{0:0{_DIGITS}d}-{secrets.token_hex(4)}"


def from_the_future(run: str, now_ns: int) -> bool:
    """Whether no store could have made `run` by `now_ns` (its own clock) — a forged run."""
    return run > horizon(now_ns)


def horizon(now_ns: int) -> str:
    """The latest run text a store whose clock reads `now_ns` may have made (margin included)."""
    return f"{now_ns + FUTURE_MARGIN_NS:0{_DIGITS}d}~"
