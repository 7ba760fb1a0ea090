"""Task control (docs/tasks.md): time limits, retry limits, and the exceptions a task steers with."""

import asyncio
import contextlib

import orjson
import pytest

from guillotina_amqp import add_task, task
from guillotina_amqp.exceptions import TaskCanceled, TaskErrored
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.utils import lines, publish_raw, queue_counts, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")


async def counts() -> tuple[int, int, int]:
    """(main, delay, error) messages ready."""
    main, delay, error = (await queue_counts()).values()
    return main, delay, error


def stamps(path) -> list[float]:
    """When each run of a tests.app.steer / stamp_and_fail task started."""
    return [float(line) for line in lines(path)]


async def ended(state: TaskState) -> dict:
    """The state once the task ended for good (waited through its retries)."""
    with contextlib.suppress(TaskErrored, TaskCanceled):
        await state.result(timeout=60)
    return await state.get_state()


async def settled(expected: tuple[int, int, int]) -> None:
    await wait_for(lambda: _counts_are(expected), what=f"queue counts {expected}")


async def _counts_are(expected: tuple[int, int, int]) -> bool:
    return await counts() == expected


# -- timeout ------------------------------------------------------------------------------------


async def test_a_run_past_its_timeout_is_cancelled_and_errored_while_the_worker_serves_others(
    worker, tmp_path
):
    marker = tmp_path / "slow"
    # Given a task that would sleep 60 s, limited to 3 s and never retried
    slow = await add_task(app.sleep_then_mark, str(marker), 60, _timeout=3, _max_retries=0)
    await wait_for(lambda: lines(marker) == ["started"], what="the slow task to start")

    # When another task is scheduled while it runs, then it finishes before the limit hits
    quick = await add_task(app.add, 1, 2)
    assert (await quick.join(timeout=30))["result"] == 3
    assert await slow.get_status() == TaskStatus.RUNNING  # the loop was free meanwhile

    # Then the slow one is cancelled at its limit, errored with TaskTimeout naming it
    final = await slow.join(timeout=30)
    assert final["status"] == TaskStatus.ERRORED
    assert "TaskTimeout" in final["error"]
    assert "timeout=3s" in final["error"]
    assert lines(marker) == ["started"]  # cancelled: it never got to "done"
    await settled((0, 0, 1))


@pytest.mark.app_settings({"amqp": {"max_task_retries": 5}})
async def test_a_timed_out_run_is_retried_like_any_failure(worker, tmp_path):
    marker = tmp_path / "slow"
    state = await add_task(app.sleep_then_mark, str(marker), 60, _timeout=0.3, _max_retries=1)

    final = await ended(state)

    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 1  # max_retries=1 of the call, not the worker's 5
    assert lines(marker) == ["started", "started"]
    assert "timeout=0.3s" in final["error"]
    await settled((0, 0, 1))


@pytest.mark.app_settings({"amqp": {"task_timeout": 0.5, "max_task_retries": 0}})
async def test_the_call_overrides_the_decorator_which_overrides_the_settings(worker, tmp_path):
    # settings: 0.5 s for a plain task
    by_settings = await add_task(app.sleep, 5)
    # decorator: limited_sleep has timeout=0.5; the call gives it 30 s
    by_call = await app.limited_sleep(str(tmp_path / "call"), 1.0, _timeout=30)
    by_decorator = await app.limited_sleep(str(tmp_path / "decorator"), 5)

    assert "timeout=0.5s" in (await by_settings.join(timeout=30))["error"]
    assert (await by_call.join(timeout=30))["result"] == 1.0
    assert "timeout=0.5s" in (await by_decorator.join(timeout=30))["error"]


@pytest.mark.app_settings({"amqp": {"max_task_retries": 5}})
async def test_max_retries_of_the_decorator_bounds_the_retries(worker, tmp_path):
    failing = task(app.fail_until, max_retries=1)
    state = await failing(str(tmp_path / "runs"), 100)

    final = await ended(state)

    assert final["status"] == TaskStatus.ERRORED
    assert final["job_retries"] == 1
    assert len(lines(tmp_path / "runs")) == 2
    await settled((0, 0, 1))


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, named",
    [
        ({"_timeout": -1}, "_timeout"),
        ({"_timeout": 0}, "_timeout"),
        ({"_timeout": "5"}, "_timeout"),
        ({"_timeout": True}, "_timeout"),
        ({"_timeout": float("nan")}, "_timeout"),
        ({"_max_retries": -1}, "_max_retries"),
        ({"_max_retries": 1.5}, "_max_retries"),
    ],
)
async def test_bad_options_at_the_call_raise_valueerror_and_publish_nothing(guillotina_main, options, named):
    with pytest.raises(ValueError, match=named):
        await add_task(app.add, 1, 2, **options)
    assert await counts() == (0, 0, 0)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"timeuot": 3}, "timeuot"),
        ({"timeout": -3}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"priority": 10}, "priority"),
        ({"priority": "9"}, "priority"),
    ],
)
def test_bad_decorator_options_raise_valueerror_naming_them(options, named):
    with pytest.raises(ValueError, match=named):
        task(app.add, **options)
    with pytest.raises(ValueError, match=named):
        task(**options)


@pytest.mark.parametrize(
    "field, value",
    [
        ("timeout", -1),
        ("timeout", "soon"),
        ("timeout", [1]),
        ("max_retries", -2),
        ("max_retries", "x" * 5000),
        ("priority", 10),
        ("priority", -1),
        ("priority", True),
        ("priority", 4.5),
    ],
)
async def test_a_hostile_option_in_a_message_is_refused_to_the_error_queue(worker, field, value):
    body = {
        "func": "tests.app.add",
        "args": [1, 2],
        "kwargs": {},
        "task_id": f"hostile-{field}",
        field: value,
    }
    await publish_raw(orjson.dumps(body))

    await settled((0, 0, 1))
    state = await TaskState(f"hostile-{field}").get_state()
    assert state["status"] == TaskStatus.ERRORED
    assert f"refused: '{field}' must be" in state["error"]
    assert len(state["error"]) < 200  # a huge value is not copied into the state
    # and the worker still serves tasks
    assert (await (await add_task(app.add, 2, 3)).join(timeout=30))["result"] == 5


# -- Retry, Reject, Discard, Fail ------------------------------------------------------------


async def test_retry_runs_again_after_its_delay_and_counts(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.steer, str(marker), "retry", 0.5)

    assert await state.result(timeout=60) == 2
    final = await state.get_state()
    assert final["job_retries"] == 1  # counted
    first, second = stamps(marker)
    assert second - first >= 0.5
    await settled((0, 0, 0))


async def test_retry_past_max_retries_errors_with_its_reason(worker, tmp_path):
    state = await add_task(app.steer, str(tmp_path / "runs"), "retry", 0.1, 100, _max_retries=1)

    with pytest.raises(TaskErrored, match=r"not yet \(run 2\)"):
        await state.result(timeout=60)
    assert (await state.get_state())["job_retries"] == 1
    await settled((0, 0, 1))


@pytest.mark.parametrize("delay", [None, 0.5])
async def test_reject_gives_the_message_back_without_counting_it(worker, tmp_path, delay):
    marker = tmp_path / "runs"
    # max_retries=0: a counted give-back would end it errored
    state = await add_task(app.steer, str(marker), "reject", delay, 2, _max_retries=0)

    assert await state.result(timeout=60) == 3
    assert (await state.get_state())["job_retries"] == 0
    runs = stamps(marker)
    assert len(runs) == 3
    if delay is not None:
        assert runs[1] - runs[0] >= delay and runs[2] - runs[1] >= delay
    await settled((0, 0, 0))


async def test_discard_ends_canceled_with_its_reason_and_never_runs_again(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.steer, str(marker), "discard")

    with pytest.raises(TaskCanceled, match="nothing left to do"):
        await state.result(timeout=60)
    final = await state.get_state()
    assert final["status"] == TaskStatus.CANCELED
    assert final["error"] == "nothing left to do"
    await settled((0, 0, 0))
    assert len(stamps(marker)) == 1


@pytest.mark.app_settings({"amqp": {"max_task_retries": 5}})
async def test_fail_errors_at_once_with_its_reason_without_retry(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.steer, str(marker), "fail")

    with pytest.raises(TaskErrored) as raised:
        await state.result(timeout=60)
    assert str(raised.value) == "the server said 404"
    final = await state.get_state()
    assert (final["status"], final["error"], final["job_retries"]) == (
        TaskStatus.ERRORED,
        "the server said 404",
        0,
    )
    await settled((0, 0, 1))
    assert len(stamps(marker)) == 1


# -- join / result -----------------------------------------------------------------------------


async def test_result_returns_the_result_and_waits_through_retries(worker, tmp_path):
    # the first run fails: join() would return at that errored run, result() waits for the end
    state = await add_task(app.fail_until, str(tmp_path / "runs"), 1)
    assert await state.result(timeout=60) == 2


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
async def test_result_of_an_errored_task_raises_taskerrored_with_the_remote_traceback(worker):
    state = await add_task(app.fail, "kaboom")

    with pytest.raises(TaskErrored) as raised:
        await state.result(timeout=60)
    message = str(raised.value)
    assert message.startswith("Traceback (most recent call last):")
    assert "ValueError: kaboom" in message
    assert message == (await state.get_state())["error"]


async def test_join_and_result_raise_timeouterror_at_their_limit(guillotina_main):
    state = await add_task(app.add, 1, 2)  # no worker: it stays scheduled

    with pytest.raises(asyncio.TimeoutError):
        await state.join(timeout=0.2)
    with pytest.raises(asyncio.TimeoutError):
        await state.result(timeout=0.2)
    assert await state.get_status() == TaskStatus.SCHEDULED


async def test_options_travel_in_the_message_only_when_set(worker):
    limited = await add_task(app.add, 1, 2, _timeout=2.5, _max_retries=0)
    plain = await add_task(app.add, 1, 2)

    job_data = (await limited.join(timeout=30))["job_data"]
    assert (job_data["timeout"], job_data["max_retries"]) == (2.5, 0)
    assert not {"timeout", "max_retries"} & set((await plain.join(timeout=30))["job_data"])
