"""Tasks the benchmark schedules; a Guillotina application (`bench.tasks` in `applications`)."""

import asyncio
import os
import time
from typing import Any

app_settings: dict[str, Any] = {}

_ran = 0


def includeme(root: Any, settings: dict) -> None:
    """Nothing to register: the worker allows tasks under the configured applications."""


async def add(a: int, b: int, total: int = 0, marker: str | None = None) -> int:
    """a + b. The `total`-th call in this process writes the time to `marker`.

    With the memory state manager the state lives in the worker process, so this
    marker is how the benchmark learns that every task body ran.
    """
    global _ran
    _ran += 1
    if marker and _ran == total:
        tmp = f"{marker}.tmp"
        with open(tmp, "w") as fh:
            fh.write(repr(time.time()))
        os.replace(tmp, marker)
    return a + b


async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds
