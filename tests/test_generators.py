"""Async-generator tasks report progress (DEBUG) and results (RESULT) (README)."""

from datetime import datetime

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.utils import wait_for


def texts(eventlog: list) -> list[str]:
    return [text for _, text in eventlog]


@pytest.mark.parametrize("manager", ["memory", "redis"])
async def test_debug_yields_fill_the_eventlog_and_results_the_result(worker, manager):
    final = await (await add_task(app.progress, 3)).join()

    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] == [0, 1, 2]  # the junk yielded after each step is ignored
    assert texts(final["eventlog"]) == ["step 0", "step 1", "step 2"]
    stamps = [datetime.fromisoformat(stamp) for stamp, _ in final["eventlog"]]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert stamps == sorted(stamps)


async def test_eventlog_is_visible_while_the_task_runs(worker, tmp_path):
    go = tmp_path / "go"
    state = await add_task(app.wait_then_log, str(go))

    running = await wait_for(lambda: _running_with_events(state), what="the first event of a running task")
    assert texts(running["eventlog"]) == ["first"]

    go.touch()
    final = await state.join()
    assert texts(final["eventlog"]) == ["first", "second"]
    assert final["result"] == ["done"]


async def _running_with_events(state: TaskState) -> dict | None:
    current = await state.get_state()
    return current if current["status"] == TaskStatus.RUNNING and current.get("eventlog") else None


async def test_nothing_valid_yielded_means_no_result(worker):
    final = await (await add_task(app.only_junk)).join()
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] is None
    assert final["eventlog"] == []
