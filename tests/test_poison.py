"""Poison messages: error queue, one clear log line, the worker keeps consuming (docs/design.md)."""

import logging
import uuid

import orjson
import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus, get_state_manager
from tests import app
from tests.utils import error_queue_count, publish_raw, queue_counts, wait_for

TASK_ID = "poison-" + str(uuid.uuid4())

#: name -> (body, what the log line and the state's error must say, task id the log names)
POISON = {
    "invalid JSON": (b'{"func": "tests.app.add", ', "not valid JSON", None),
    "not an object": (b"[1, 2, 3]", "not a JSON object", None),
    "no func": ({"task_id": TASK_ID, "args": [1, 2]}, "lacks func", TASK_ID),
    "no task_id": ({"func": "tests.app.add", "args": [1, 2]}, "lacks task_id", None),
    "unknown function": ({"func": "tests.app.no_such_task", "task_id": TASK_ID}, "cannot import", TASK_ID),
    "unknown module": ({"func": "tests.app.no_such_module.f", "task_id": TASK_ID}, "cannot import", TASK_ID),
    "args not a list": (
        {"func": "tests.app.add", "task_id": TASK_ID, "args": 3},
        "'args' is not a list",
        TASK_ID,
    ),
}


pytestmark = pytest.mark.usefixtures("outside_container", "info_logs")


def encoded(body) -> bytes:
    return body if isinstance(body, bytes) else orjson.dumps(body)


@pytest.mark.parametrize("case", POISON)
async def test_poison_message_goes_to_the_error_queue_and_the_worker_goes_on(worker, caplog, case):
    body, reason, task_id = POISON[case]
    await publish_raw(encoded(body))
    await wait_for(lambda: _errors_are(1), what="the poison message in the error queue")

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # one clear line, no traceback spam
    assert reason in errors[0] and "error queue" in errors[0], errors
    if task_id:
        assert task_id in errors[0]
        state = await get_state_manager().get(task_id)
        assert state["status"] == TaskStatus.ERRORED
        assert reason in state["error"]

    # the worker still consumes: a valid task sent right after finishes
    final = await (await add_task(app.add, 1, 2)).join()
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 3)
    counts = list((await queue_counts()).values())
    assert counts == [0, 0, 1]  # neither retried nor requeued


async def _errors_are(count: int) -> bool:
    return await error_queue_count() == count


async def test_a_burst_of_poison_does_not_stop_the_worker(worker):
    for body, _, _ in POISON.values():
        await publish_raw(encoded(body))
    states = [await add_task(app.add, i, 1) for i in range(5)]
    finals = [await state.join() for state in states]
    assert [f["result"] for f in finals] == [1, 2, 3, 4, 5]
    await wait_for(lambda: _errors_are(len(POISON)), what="every poison message in the error queue")
    assert worker.total_run == 5
