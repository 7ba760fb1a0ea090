"""`_expires` (docs/tasks.md#expiry): a task not started by its deadline never runs; it ends canceled."""

import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.test_security import task_message
from tests.utils import (
    BOTH_MANAGERS,
    error_queue_count,
    lines,
    logged,
    publish_raw,
    queue_counts,
    running_worker,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("outside_container")


@BOTH_MANAGERS
@pytest.mark.parametrize("expires", [0.01, datetime.now(timezone.utc) - timedelta(hours=1)])
async def test_a_task_past_its_deadline_never_runs_and_ends_canceled(
    guillotina_main, manager, tmp_path, expires
):
    marker = tmp_path / "runs"
    # Given a task whose deadline passes before any worker takes it
    deadline = _deadline(expires)
    state = await add_task(app.write_marker, str(marker), _expires=expires)
    assert (await state.get_state())["status"] == TaskStatus.SCHEDULED
    await wait_for(lambda: time.time() > deadline, what="the deadline")

    # When a worker takes it, then it is canceled, says it expired, and never ran
    async with running_worker():
        final = await state.join(wait=0.05)
    assert final["status"] == TaskStatus.CANCELED
    assert final["error"].startswith("expired: not started by ")
    assert lines(marker) == []
    assert set((await queue_counts()).values()) == {0}


def _deadline(expires) -> float:
    return expires.timestamp() if isinstance(expires, datetime) else time.time() + expires


async def test_a_task_started_before_its_deadline_runs(worker, tmp_path):
    marker = tmp_path / "runs"
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    for expires in (300, later):
        state = await add_task(app.write_marker, str(marker), _expires=expires)
        assert (await state.join(wait=0.05))["status"] == TaskStatus.FINISHED
    assert lines(marker) == ["ran", "ran"]


async def test_the_decorators_expires_applies_to_every_call(guillotina_main, info_logs):
    state = await app.soon_expired()
    async with running_worker():
        final = await state.join(wait=0.05)
    assert final["status"] == TaskStatus.CANCELED
    assert "expired" in final["error"]
    assert logged(info_logs, state.task_id, "expired")


@pytest.mark.parametrize("expires", [-1, "60", True, float("inf"), float("nan"), [1]])
async def test_a_bad_expires_is_refused_at_the_call_and_nothing_is_sent(guillotina_main, expires):
    with pytest.raises(ValueError, match="_expires must be seconds >= 0 or a datetime"):
        await add_task(app.add, 1, 2, _expires=expires)
    assert set((await queue_counts()).values()) == {0}


@pytest.mark.parametrize("value", ["soon", True, {"at": 1}, [1]])
async def test_a_hostile_expires_goes_to_the_error_queue_and_the_worker_serves_on(worker, value):
    await publish_raw(orjson.dumps({**task_message("tests.app.add", 1, 2), "expires": value}))
    await wait_for(lambda: _one_error(), what="the message in the error queue")
    assert (await (await add_task(app.add, 1, 2)).join(wait=0.05))["result"] == 3


async def _one_error() -> bool:
    return await error_queue_count() == 1
