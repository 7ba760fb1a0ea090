"""A task that outlives RabbitMQ's consumer_timeout.

See docs/operations.md#long-tasks-and-rabbitmqs-consumer_timeout.

Runs on the node of scripts/ct-engine.sh (ct@localhost, AMQP 5760) whose consumer_timeout is
5 s: RabbitMQ closes the worker's channel at its next check (about once a minute) and
requeues the long task's message while the task still runs. `make test-long` starts the
node, runs tests/long with RABBITMQ pointing at it and stops it.
"""

import asyncio
import os

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests.utils import all_empty, lines, logged, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")

SLOTS = 2
SHORT_TASKS = 10
#: RabbitMQ checks consumer timeouts about once a minute: room for two checks on a busy machine
CLOSED_WITHIN = 240
KEPT_ASIDE = "delivered again while this worker runs it"


async def span(path: str, label: str, seconds: float = 0, go: str = "") -> str:
    """Appends "start <label>", waits `seconds` or until the file `go` exists, appends "end <label>"."""
    with open(path, "a") as fh:
        fh.write(f"start {label}\n")
    if go:
        while not os.path.exists(go):
            await asyncio.sleep(0.1)
    else:
        await asyncio.sleep(seconds)
    with open(path, "a") as fh:
        fh.write(f"end {label}\n")
    return label


def most_at_once(events: list[str]) -> int:
    """The most tasks running together, replayed from their start/end lines (in order)."""
    running = most = 0
    for event in events:
        running += 1 if event.startswith("start ") else -1
        most = max(most, running)
    return most


@pytest.mark.app_settings({"amqp": {"allowed_tasks": ["tests.app", "tests.long"]}})
async def test_a_task_past_consumer_timeout_runs_once_and_its_copy_waits(
    guillotina_main, tmp_path, info_logs
):
    runs, go = tmp_path / "runs", tmp_path / "go"
    async with running_worker(max_size=SLOTS):
        long = await add_task(span, str(runs), "long", go=str(go))
        await wait_for(lambda: "start long" in lines(runs), what="the long task to start")
        await wait_for(
            lambda: logged(info_logs, "lost its RabbitMQ channel"),
            CLOSED_WITHIN,
            "RabbitMQ to time the ack out",
        )
        await wait_for(lambda: logged(info_logs, KEPT_ASIDE), 60, "the requeued copy to come back")

        # more short tasks than the one slot left, while the copy waits unacked
        shorts = [await add_task(span, str(runs), f"short{i}", 0.5) for i in range(SHORT_TASKS)]
        for short in shorts:
            assert (await short.join(timeout=120))["status"] == TaskStatus.FINISHED
        go.touch()
        final = await long.join(timeout=120)

    assert final["status"] == TaskStatus.FINISHED
    events = lines(runs)
    assert events.count("start long") == 1  # ran once, though RabbitMQ requeued it
    assert sorted(e for e in events if e.startswith("end short")) == sorted(
        f"end short{i}" for i in range(10)
    )
    assert most_at_once(events) == SLOTS  # never more than max_running_tasks
    # RabbitMQ's reason is in the channel-close line
    closed = [r.getMessage() for r in info_logs.records if "lost its RabbitMQ channel" in r.getMessage()]
    assert all("406" in line and "delivery acknowledgement" in line for line in closed), closed
    # the copy waited aside: one line, no round through the delay queue, no false promise
    assert logged(info_logs, KEPT_ASIDE, "long") == 1
    assert logged(info_logs, "is locked by") == 0
    assert logged(info_logs, "will redeliver") == 0
    assert logged(info_logs, "ack lost") == 0  # the copy settled it
    assert await all_empty()  # the copy was acked: nothing came back when the worker closed
