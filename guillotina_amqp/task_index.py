"""Pages of a container's tasks read from its index (docs/design.md): the cost of a page is its size.

A page is read newest first; its cursor names the last entry read, so the next page
starts right after it even while new tasks arrive. Entries whose state expired, or that
moved to another status since the set was read, are skipped (and stale ones dropped).
"""

import base64
import binascii
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson

from guillotina_amqp.job import dotted_name_of
from guillotina_amqp.names import DONE_INDEXED, INDEXED_STATUSES
from guillotina_amqp.state.manager import StateManager
from guillotina_amqp.state.operations import Position

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: index entries one call reads at most (a filter that matches few tasks pages through them)
MAX_EXAMINED = 2000
#: entries read at a time under a function filter
READ_AHEAD = 200
#: buckets of the throughput chart: the last hour in 5-minute steps
CHART_BUCKETS, CHART_STEP = 12, 300.0

Owned = Callable[[str, dict[str, Any]], Awaitable[bool]]


@dataclass
class Page:
    tasks: list[dict[str, Any]]
    cursor: str | None  # None: no further page

    def as_json(self) -> dict[str, Any]:
        return {"items": self.tasks, "cursor": self.cursor}


def encode_cursor(position: Position) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(position))).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; ValueError for anything page() did not make."""
    try:
        score, task_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, TypeError):
        score = task_id = None
    # only what encode_cursor writes: a finite number (a "nan" or "inf", as text or not, would
    # reach the store's range query) and a task id
    number = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
    if not number or not isinstance(task_id, str):
        raise ValueError(f"invalid cursor {cursor[:100]!r}: pass the cursor of the previous page")
    return float(score), task_id


def check_query(limit: Any, status: str | None) -> int:
    """The page size asked for; ValueError naming a bad limit or status."""
    try:
        size = DEFAULT_LIMIT if limit in (None, "") else int(limit)
    except ValueError:
        raise ValueError(f"invalid limit {limit!r}: a number from 1 to {MAX_LIMIT}") from None
    if not 1 <= size <= MAX_LIMIT:
        raise ValueError(f"invalid limit {limit!r}: a number from 1 to {MAX_LIMIT}")
    if status is not None and status not in INDEXED_STATUSES:
        raise ValueError(f"invalid status {status!r}: one of {', '.join(INDEXED_STATUSES)}")
    return size


async def page(
    manager: StateManager,
    container: str,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    status: str | None = None,
    owned: Owned | None = None,
    function: str | None = None,
) -> Page:
    """Up to `limit` task summaries of `container` (a task_id_prefix), newest first; only
    `status` ones, and ones whose function contains `function`, when given.

    A filter that matches few tasks reads at most MAX_EXAMINED entries per call and answers
    fewer tasks with a cursor to go on from: a page never costs more than that.
    """
    after = decode_cursor(cursor) if cursor else None
    tasks: list[dict[str, Any]] = []
    examined = 0
    while len(tasks) < limit and examined < MAX_EXAMINED:
        wanted = limit - len(tasks) if function is None else READ_AHEAD
        positions = await manager.index_page(container, status, after, wanted)
        entries = await manager.index_entries([task_id for _, task_id in positions])
        await manager.unindex(container, [i for (_, i), (state, _) in zip(positions, entries) if not state])
        for position, (state, times) in zip(positions, entries):
            if len(tasks) == limit:
                break
            after, examined = position, examined + 1
            task = summary(position[1], state, times) if state else None
            if (
                task
                and matches(task, status, function)
                and (owned is None or await owned(position[1], state))
            ):
                tasks.append(task)
        if len(positions) < wanted and (not positions or after == positions[-1]):
            return Page(tasks, None)  # the index has nothing after what was examined
    return Page(tasks, encode_cursor(after) if after else None)


def matches(task: dict[str, Any], status: str | None, function: str | None) -> bool:
    # an entry may have moved on since the status set was read
    return (status is None or task["status"] == status) and (function is None or function in task["function"])


async def all_ids(manager: StateManager, container: str) -> list[str]:
    """Every id of the container whose state exists, newest first (the original's unpaged listing)."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        found = await page(manager, container, MAX_LIMIT, cursor)
        ids += [task["task_id"] for task in found.tasks]
        if found.cursor is None:
            return ids
        cursor = found.cursor


def summary(task_id: str, state: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
    """What the dashboard and `g amqp-tasks list` show of one task."""
    now = time.time()
    created, started, ended = times.get("created"), times.get("started"), times.get("ended")
    eventlog = state.get("eventlog") or []
    error = state.get("error") or ""
    return {
        "task_id": task_id,
        "status": state.get("status"),
        "function": dotted_name_of(state.get("job_data") or {}),
        "created": created,
        "age": now - created if created else None,
        "duration": ((ended or now) - started) if started else None,
        "retries": state.get("job_retries") or 0,
        "progress": eventlog[-1][1] if eventlog else None,
        "events": len(eventlog),
        "error": error.strip().splitlines()[-1] if error.strip() else None,
    }


async def throughput(manager: StateManager, container: str) -> dict[str, Any]:
    """Tasks that ended per 5-minute bucket over the last hour, by final status."""
    now = time.time()
    edges = [now - CHART_STEP * (CHART_BUCKETS - i) for i in range(CHART_BUCKETS + 1)]
    counts = {status: await manager.index_counts(container, status, edges) for status in DONE_INDEXED}
    return {"since": edges[0], "step": CHART_STEP, **counts}
