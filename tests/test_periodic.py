"""Periodic tasks (docs/tasks.md#periodic-tasks): fired by the workers, once per period however many run."""

import signal

import pytest

from guillotina_amqp import periodic
from guillotina_amqp import periodic_tasks as periodic_module
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import BOTH_MANAGERS, REDIS_ONLY, lines, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


def periods(task_ids: list[str]) -> list[int]:
    """The period (epoch second) of each firing, from its task id periodic:<name>:<period>."""
    return [int(task_id.rsplit(":", 1)[1]) for task_id in task_ids]


def assert_each_period_once(found: list[int], every: int, at_least: int) -> None:
    assert len(found) == len(set(found)), f"a period fired twice: {sorted(found)}"
    assert len(found) >= at_least
    expected = list(range(min(found), max(found) + every, every))
    assert sorted(found) == expected, f"a period was skipped: {sorted(found)}"


@pytest.fixture
def every_second():
    """tests.app.record_period declared periodic, every second, for this test only."""
    app.PERIODS.clear()
    definition = periodic(every=1)(app.record_period)
    yield definition
    periodic_module.unregister("tests.app.record_period")
    app.PERIODS.clear()


@BOTH_MANAGERS
async def test_two_workers_fire_each_period_exactly_once(guillotina_main, manager, every_second):
    # Given two workers sharing the state manager, over at least three periods
    async with running_worker(), running_worker():
        await wait_for(lambda: len(set(app.PERIODS)) >= 4, timeout=60, what="four periods")
    # Then each period fired exactly once, none skipped, each an ordinary finished task
    assert_each_period_once(periods(app.PERIODS), 1, 4)
    state = await TaskState(app.PERIODS[-1]).get_state()
    assert state["status"] == TaskStatus.FINISHED
    assert state["result"] == app.PERIODS[-1]


@REDIS_ONLY
async def test_two_worker_processes_fire_each_period_once_and_one_survivor_goes_on(manager, tmp_path):
    marks = tmp_path / "periods"
    config = worker_config()
    config["applications"].append("tests.periodic_app")
    env = {app.PERIODIC_MARKS_ENV: str(marks)}  # tests.periodic_app is never imported here
    first, second = WorkerProcess(config, env=env), WorkerProcess(config, env=env)
    async with first, second:
        await first.wait_consuming()
        await second.wait_consuming()
        start = len(lines(marks))
        # Given two worker processes over three periods
        await wait_for(lambda: len(lines(marks)) >= start + 3, timeout=60, what="three periods")
        # When one of them stops, then the other one goes on firing
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
        stopped = len(lines(marks))
        await wait_for(lambda: len(lines(marks)) >= stopped + 3, timeout=60, what="three more periods")
        second.signal(signal.SIGTERM)
        assert await second.wait_exit() == 0
    fired = [line.split()[0] for line in lines(marks)]
    assert_each_period_once(periods(fired), 1, 6)
    assert "tests.periodic_app.every_second fired" in first.output + second.output


def test_an_invalid_schedule_is_refused_at_import_naming_the_task():
    with pytest.raises(ValueError, match=r"periodic task tests.app.noop: invalid cron expression '\* \* \*'"):
        periodic(cron="* * *")(app.noop)
    with pytest.raises(ValueError, match="periodic task tests.app.noop: every must be a positive number"):
        periodic(every=-5)(app.noop)
    with pytest.raises(ValueError, match="periodic task tests.app.add: it is called without arguments"):
        periodic(every=60)(app.add)
    assert "tests.app.noop" not in periodic_module._periodic  # nothing registered by the refused


def test_cron_periods_follow_the_expression_in_utc():
    schedule = periodic_module.Schedule("t", cron="*/5 * * * *")
    now = 1_800_000_123.5  # 2027-01-15T08:02:03.5Z
    assert schedule.latest(now) == 1_800_000_000  # 08:00
    assert schedule.following(now) == 1_800_000_300  # 08:05
    assert schedule.latest(1_800_000_300) == 1_800_000_300  # a fire time is its own period
    assert schedule.grace(1_800_000_000) == periodic_module.MISFIRE_GRACE
