"""Random and mutated messages against one worker: each ends in the error queue or acked,
touching no state but its own id's; a normal task still finishes afterwards.

`AMQP_FUZZ_COUNT` sets how many messages (default 1500, a few seconds); a larger run,
e.g. AMQP_FUZZ_COUNT=50000, is the same test.
"""

import os
import random
import string
import time
from typing import Any

import aioamqp
import orjson
import pytest

from guillotina_amqp import add_task, liveness, names
from guillotina_amqp import message as messages
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskStatus, get_state_manager
from guillotina_amqp.state.manager import is_valid_task_id
from tests import app
from tests.test_security import task_message
from tests.utils import queue_counts, redis_client, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")
COUNT = int(os.environ.get("AMQP_FUZZ_COUNT", "1500"))
VICTIM = "fuzz-victim"
FUNCS = [
    "tests.app.add",
    "tests.app.noop",
    "tests.app.falsy",
    "os.system",
    "builtins.eval",
    "guillotina_amqp.utils.add_task",
    "guillotina_amqp.utils._run_object_task",
    "tests.app.no_such",
    "",
    "x",
]
IDS = [
    "cancel",
    "lock:" + VICTIM,
    "eventlog:" + VICTIM,
    "meta:x",
    VICTIM,
    "",
    "a\nb",
    "é",
    "x" * 300,
    7,
    None,
]
HEADERS = [
    messages.SIGNATURE_HEADER,
    liveness.PROBE_HEADER,
    "x-guillotina-amqp-failures",
    "x-guillotina-amqp-deferrals",
    "x-death",
]


def junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == 1:
        return "".join(rng.choice(string.printable + "é\x00") for _ in range(rng.randrange(20)))
    if kind == 2:
        return rng.random()
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return "".join(rng.choice("0123456789abcdef") for _ in range(64))
    if kind == 5:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(junk(rng, depth + 1))[:10]: junk(rng, depth + 1) for _ in range(rng.randrange(4))}


#: runs a message may name: none, junk-shaped, from the future (forged), from the past (a stale copy)
RUNS = [
    "",
    "x",
    "9" * 20 + "-deadbeef",
    "0" * 20 + "-00000000",
    "1" * 20 + "-0000000g",
    "1" * 21 + "-00000000",
]


def fuzzed_run(rng: random.Random) -> Any:
    """A run no store made lately: never a newer run of the victim (that would be a real one)."""
    return rng.choice([*RUNS, junk(rng)])


def fuzzed_issued(rng: random.Random) -> Any:
    """An issue time: now, long ago (a replay), far ahead, or no time at all."""
    return rng.choice([time.time(), time.time() - 10**7, time.time() + 10**7, 0, -1.5, junk(rng)])


def fuzzed_body(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 7:  # runs and issue times (the victim's id included)
        message = task_message("tests.app.add", 1, 2)
        message.update(task_id=rng.choice([VICTIM, message["task_id"]]), run=fuzzed_run(rng))
        if rng.random() < 0.5:
            message["issued"] = fuzzed_issued(rng)
        return orjson.dumps(message)
    if kind == 8:  # no message of ours: the original's, with any run and issue time
        return orjson.dumps(
            {**task_message("tests.app.add", 3, 4), "run": fuzzed_run(rng), "issued": junk(rng)}
        )
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 6:  # numbers JSON has and Python's floats or 64-bit ints do not
        return b'{"func":"tests.app.add","task_id":"big","args":[1e999,%d]}' % rng.randint(2**64, 2**80)
    if kind == 1:  # nested beyond what can be stored again
        depth = rng.randrange(200, 1100)
        return b'{"func":"tests.app.add","task_id":"deep","args":[%s]}' % (b"[" * depth + b"]" * depth)
    message: dict[str, Any] = task_message(rng.choice(FUNCS), *[junk(rng) for _ in range(rng.randrange(3))])
    if kind == 2:
        message["task_id"] = rng.choice(IDS)
    elif kind == 3:
        message[rng.choice([*message, "extra", "run"])] = junk(rng)
    elif kind == 4:
        message["args"] = ["x" * rng.randrange(3000, 6000)]  # above max_message_bytes
    return orjson.dumps(message) if rng.random() < 0.95 else orjson.dumps(message)[: rng.randrange(80)]


def fuzzed_headers(rng: random.Random) -> dict | None:
    if rng.random() < 0.5:
        return None
    return {rng.choice(HEADERS): junk(rng) for _ in range(rng.randrange(1, 3))}


async def publish_all(bodies: list[tuple[bytes, dict | None]]) -> int:
    """Publish each message (confirmed); return how many the broker itself refused."""
    settings = get_settings()
    connection = AMQPConnection(settings)
    await connection.open(max_time=10)
    refused = 0
    try:
        channel = await connection.channel(confirm=True)
        for body, headers in bodies:
            try:
                await channel.publish(body, settings.exchange, settings.queue, properties=_props(headers))
            except (aioamqp.exceptions.PublishFailed, aioamqp.ChannelClosed):
                refused += 1
                channel = await connection.channel(confirm=True)
    finally:
        await connection.close()
    return refused


def _props(headers: dict | None) -> dict:
    return {"delivery_mode": 2, **({"headers": headers} if headers else {})}


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0, "max_message_bytes": 4096}})
async def test_fuzzed_messages_never_stall_a_worker_nor_touch_another_tasks_state(worker):
    victim = await (await add_task(app.add, 1, 1, _task_id=VICTIM)).join()
    rng = random.Random(int(os.environ.get("AMQP_FUZZ_SEED", "1129")))
    bodies = [(fuzzed_body(rng), fuzzed_headers(rng)) for _ in range(COUNT)]

    assert await publish_all(bodies) < len(bodies) // 10
    await wait_for(lambda: _settled(worker, len(bodies)), timeout=240, what="every fuzzed message settled")

    after = await add_task(app.add, 2, 3)
    final = await after.join()
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 5)
    assert await get_state_manager().get(VICTIM) == victim
    await _only_own_ids_touched({_task_id(body) for body, _ in bodies} | {after.task_id})


SIGNED_COUNT = max(COUNT // 5, 50)


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0, "signing_key": "fuzz-key", "replay_window": 600}})
async def test_fuzzed_runs_and_issue_times_of_signed_messages(worker):
    """Messages signed with the right key, so that the run and issue-time checks are what meets
    them: each is run, skipped or refused, and none touches the victim's state."""
    victim = await (await add_task(app.add, 1, 1, _task_id=VICTIM)).join()
    rng = random.Random(int(os.environ.get("AMQP_FUZZ_SEED", "1129")) + 1)
    bodies = []
    for _ in range(SIGNED_COUNT):
        body = fuzzed_body(random.Random(rng.random())) if rng.random() < 0.2 else _run_shaped(rng)
        bodies.append((body, {messages.SIGNATURE_HEADER: messages.signature(body, "fuzz-key")}))

    assert await publish_all(bodies) == 0
    await wait_for(lambda: _settled(worker, len(bodies)), timeout=240, what="every fuzzed message settled")

    after = await add_task(app.add, 2, 3)
    assert (await after.join())["result"] == 5
    assert await get_state_manager().get(VICTIM) == victim
    await _only_own_ids_touched({_task_id(body) for body, _ in bodies} | {after.task_id})


def _run_shaped(rng: random.Random) -> bytes:
    message = task_message("tests.app.add", 1, 2)
    message.update(task_id=rng.choice([VICTIM, message["task_id"]]), run=fuzzed_run(rng))
    message["issued"] = fuzzed_issued(rng)
    if rng.random() < 0.3:
        message["eta"] = rng.choice([time.time() - 10**6, time.time() + 0.5, message["issued"]])
    return orjson.dumps(message)


def _task_id(body: bytes) -> str | None:
    try:
        task_id = orjson.loads(body).get("task_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None


async def _settled(worker, published: int) -> bool:
    counts = await queue_counts()
    settings = get_settings()
    waiting = counts[settings.queue] + counts[names.delay_queue(settings.queue)]
    return waiting == 0 and not worker._handlers and counts[names.error_queue(settings.queue)] <= published


async def _only_own_ids_touched(ids: set) -> None:
    """Every key under the prefix belongs to a valid id some message named, or is the cancel set."""
    prefix = get_settings().redis_prefix_key
    client = await redis_client()
    try:
        async for raw in client.scan_iter(match=f"{prefix}*", count=1000):
            name = raw.decode()[len(prefix) :]
            kind = (await client.type(raw)).decode()
            if name == "cancel" or name.startswith(("meta:workers", "meta:index:")):
                continue  # the cancel set, worker presence and container indexes: no task's own
            owner = name
            for bookkeeping in ("lock:", "eventlog:", "meta:times:"):
                owner = owner.removeprefix(bookkeeping)
            assert is_valid_task_id(owner) and owner in ids, name
            expected = {"eventlog:": "list", "lock:": "string"}
            assert kind == next((v for k, v in expected.items() if name.startswith(k)), "hash"), name
    finally:
        await client.aclose()
