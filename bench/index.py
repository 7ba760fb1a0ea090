"""A page of 50 of a container's tasks among a million other states (docs/performance.md; goal: 10 ms).

    .venv/bin/python bench/index.py [--others 1000000] [--mine 10000] [--repeat 200]

Writes `--others` task states of 1,000 other containers (with their own index entries)
straight into Redis, schedules and ends `--mine` tasks of one container through the
state manager (so its index is written by the real code path), then times pages of 50
read through guillotina_amqp.task_index: the first page, a page deep in the listing
(by cursor), and the errored ones only. The SCAN the unpaged listing did before the
index is timed once beside them. Everything lives under its own Redis prefix and is
deleted at the end. Prints one line per measure.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from guillotina.factory import make_app  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from guillotina_amqp import names, task_index  # noqa: E402
from guillotina_amqp.state.manager import get_state_manager  # noqa: E402

PAGE = 50
BATCH = 10_000


def redis_address() -> tuple[str, int]:
    host, _, port = os.environ.get("REDIS", "127.0.0.1:6379").partition(":")
    return host, int(port)


async def fill_others(redis: Redis, prefix: str, count: int) -> None:
    """`count` finished states of 1,000 other containers, each also in its container's index."""
    now, done = time.time(), orjson.dumps("finished")
    for start in range(0, count, BATCH):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + BATCH, count)):
                container = names.task_id_prefix("db", f"other{i % 1000}")
                task_id = f"{container}{uuid.uuid4()}"
                pipe.hset(names.state_key(prefix, task_id), mapping={"status": done, "job_retries": b"0"})
                pipe.zadd(names.index_key(prefix, container), {task_id: now - i})
                pipe.zadd(names.index_key(prefix, container, "finished"), {task_id: now - i})
            await pipe.execute()


async def fill_mine(container: str, count: int) -> None:
    """`count` tasks of our container scheduled and ended through the state manager; a tenth errored."""
    manager = get_state_manager()
    job = {"func": "bench.tasks.add", "args": [1, 2], "kwargs": {}}
    for start in range(0, count, 500):
        ids = [f"{container}{uuid.uuid4()}" for _ in range(start, min(start + 500, count))]
        initial = {"status": "scheduled", "eventlog": [], "job_retries": 0, "job_data": job}
        await asyncio.gather(*(manager.create(task_id, initial) for task_id in ids))
        await asyncio.gather(
            *(
                manager.finish(task_id, {"status": "errored" if n % 10 == 0 else "finished"}, 86400)
                for n, task_id in enumerate(ids, start)
            )
        )


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, float]:
    """Median and 95th percentile of `call()` in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


async def measure(container: str, repeat: int) -> None:
    manager = get_state_manager()
    first = await task_index.page(manager, container, PAGE)
    assert len(first.tasks) == PAGE and first.cursor, "the container has fewer tasks than a page"
    deep = first
    for _ in range(20):  # 1,000 tasks in
        deep = await task_index.page(manager, container, PAGE, deep.cursor)
    measures = {
        "first page of 50": lambda: task_index.page(manager, container, PAGE),
        "page of 50 after 1,000": lambda: task_index.page(manager, container, PAGE, deep.cursor),
        "page of 50 errored": lambda: task_index.page(manager, container, PAGE, None, "errored"),
    }
    for label, call in measures.items():
        median, p95 = await timed(call, repeat)
        print(f"{label:<28} median {median:6.2f} ms   p95 {p95:6.2f} ms", flush=True)
    started = time.perf_counter()
    found = [task_id async for task_id in manager.list(container)]
    scan = (time.perf_counter() - started) * 1000
    print(f"{'SCAN of every key (before)':<28} once   {scan:8.1f} ms ({len(found)} ids)", flush=True)


async def cleanup(redis: Redis, prefix: str) -> None:
    batch = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=BATCH):
        batch.append(key)
        if len(batch) == BATCH:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--others", type=int, default=1_000_000, help="states of other containers")
    parser.add_argument("--mine", type=int, default=10_000, help="tasks of the container listed")
    parser.add_argument("--repeat", type=int, default=200, help="timed pages per measure")
    args = parser.parse_args()
    host, port = redis_address()
    prefix = f"bench-index-{uuid.uuid4().hex[:8]}-"
    app = make_app(
        settings={
            "applications": ["guillotina_amqp", "guillotina.contrib.redis"],
            "databases": {},
            "root_user": {"password": "admin"},
            "jwt": {"secret": uuid.uuid4().hex, "algorithm": "HS256"},
            "amqp": {"persistent_manager": "redis"},
            "redis": {"host": host, "port": port},
            "redis_prefix_key": prefix,
        },
        loop=asyncio.get_running_loop(),
    )
    await app.startup()
    redis = Redis(host=host, port=port)
    container = names.task_id_prefix("db", "mine")
    try:
        started = time.perf_counter()
        await fill_others(redis, prefix, args.others)
        await fill_mine(container, args.mine)
        keys = await redis.dbsize()
        print(f"filled in {time.perf_counter() - started:.0f} s: {keys} keys in Redis", flush=True)
        await measure(container, args.repeat)
    finally:
        await cleanup(redis, prefix)
        await redis.aclose()
        await get_state_manager().finalize()
        await app.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
