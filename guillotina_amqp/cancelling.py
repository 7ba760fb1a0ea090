"""Cancelling background tasks for good.

Python 3.11's `asyncio.wait_for` (which redis-py uses for every command it sends) returns
the inner result, swallowing a cancellation that arrives as the inner call completes: a
loop cancelled at that instant carries on, and whoever waits for it waits for ever.
"""

import asyncio
from typing import Iterable

#: seconds between two cancellations of a task that is still running
PATIENCE = 5.0


async def cancel_and_wait(tasks: Iterable[asyncio.Future], patience: float | None = None) -> None:
    """Cancel `tasks` and return once all are done, cancelling again those still running
    `patience` seconds (default PATIENCE) later; their results and exceptions stay on them."""
    patience = PATIENCE if patience is None else patience
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
