"""Deferred starts (docs/tasks.md): `_countdown` / `_eta` wait in the broker's delay tiers."""

import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from guillotina_amqp import add_task, cancel_task, timing
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.test_security import task_message
from tests.utils import BOTH_MANAGERS, error_queue_count, lines, publish_raw, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


@BOTH_MANAGERS
async def test_a_countdown_task_starts_after_its_time_and_waits_scheduled_meanwhile(worker, manager):
    before = time.time()
    state = await add_task(app.stamp, _countdown=1.5)
    waiting = await state.get_state()
    assert waiting["status"] == TaskStatus.SCHEDULED
    assert waiting["eta"] >= before + 1.5

    final = await state.join()
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] >= waiting["eta"]  # never before its time
    assert final["job_retries"] == 0


async def test_an_eta_task_waits_in_the_broker_across_worker_restarts(guillotina_main, tmp_path):
    marker = tmp_path / "runs"
    eta = datetime.now(timezone.utc) + timedelta(seconds=3)
    state = await add_task(app.stamp, str(marker), _eta=eta)
    async with running_worker():  # a worker that comes and goes while the task waits
        assert (await state.get_state())["status"] == TaskStatus.SCHEDULED
    assert lines(marker) == []
    async with running_worker():
        final = await state.join()
    assert final["result"] >= eta.timestamp() and lines(marker) == ["ran"]


async def test_a_past_eta_runs_now(worker):
    final = await (await add_task(app.add, 1, 2, _eta=time.time() - 3600)).join()
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 3)


async def test_a_task_canceled_while_it_waits_never_runs(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.write_marker, str(marker), _countdown=1)
    assert await cancel_task(state.task_id) is True
    final = await state.join()
    assert final["status"] == TaskStatus.CANCELED and lines(marker) == []


@pytest.mark.parametrize(
    "options",
    [
        {"_countdown": -1},
        {"_countdown": "soon"},
        {"_countdown": float("nan")},
        {"_countdown": 1, "_eta": 5.0},
    ],
    ids=["negative", "text", "nan", "both"],
)
async def test_bad_countdowns_are_refused_at_the_call(guillotina_main, options):
    with pytest.raises(ValueError, match="_countdown|_eta"):
        await add_task(app.add, 1, 2, **options)


@pytest.mark.parametrize("eta", ["tomorrow", [1], True, 1e400])
async def test_a_message_with_a_bad_eta_goes_to_the_error_queue(worker, eta):
    body = orjson.dumps({**task_message("tests.app.add", 1, 2), "eta": eta}) if eta != 1e400 else None
    if body is None:
        body = orjson.dumps(task_message("tests.app.add", 1, 2))[:-1] + b',"eta":1e400}'
    await publish_raw(body)
    await wait_for(error_queue_count, what="the message in the error queue")
    final = await (await add_task(app.add, 1, 1)).join()
    assert final["result"] == 2


def test_a_tier_never_overshoots_the_start():
    now = 1000.0
    for seconds in (0.05, 0.1, 0.5, 1, 7.3, 60, 3600, 86400):
        wait = timing.wait_ms(now + seconds, now=now)
        assert wait is None if seconds < 0.1 else 0 < wait <= seconds * 1000
