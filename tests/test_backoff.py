"""Retry delays (docs/tasks.md#retry-delays): exponential backoff with jitter through fixed-TTL tiers."""

import pytest

from guillotina_amqp import add_task, names
from guillotina_amqp.connection import AMQPConnection, declare_queues
from guillotina_amqp.settings import get_settings
from tests import app
from tests.test_control import counts, ended, settled, stamps
from tests.utils import wait_for

pytestmark = pytest.mark.usefixtures("outside_container")

BACKOFF = pytest.mark.app_settings(
    {
        "amqp": {
            "retry_backoff": True,
            "delayed_ttl_ms": 400,
            "retry_backoff_max_ms": 1600,
            "max_task_retries": 4,
        }
    }
)


def gaps(path) -> list[float]:
    runs = stamps(path)
    return [later - earlier for earlier, later in zip(runs, runs[1:])]


@BACKOFF
async def test_backoff_doubles_the_delay_up_to_its_cap_with_jitter(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.stamp_and_fail, str(marker))

    final = await ended(state)

    assert final["job_retries"] == 4
    # each delay is drawn from the upper half of min(400 ms * 2^n, 1600 ms), rounded up to a tier:
    # the broker held the message at least that long
    lower_bounds = [0.2, 0.4, 0.8, 0.8]
    assert [gap >= bound for gap, bound in zip(gaps(marker), lower_bounds)] == [True] * 4
    delays = [
        event.delay for event in app.events_of(state.task_id) if type(event).__name__ == "TaskRetriedEvent"
    ]
    assert len(delays) == 4
    assert all(
        low <= delay <= names.delay_tier_ms(2 * low * 1000) / 1000 for low, delay in zip(lower_bounds, delays)
    )
    # the original's delay queue was not used; the message ends in the error queue
    await settled((0, 0, 1))


@BACKOFF
async def test_jitter_spreads_the_delays_of_tasks_that_failed_together(worker, tmp_path):
    states = [await add_task(app.fail_until, str(tmp_path / f"runs{i}"), 1) for i in range(8)]
    for state in states:
        await state.result(timeout=60)

    delays = {
        event.delay
        for state in states
        for event in app.events_of(state.task_id)
        if event.__class__.__name__ == "TaskRetriedEvent"
    }
    assert len(delays) > 1  # 8 draws from 200..400 ms land in more than one of its 4 tiers


@pytest.mark.app_settings({"amqp": {"delayed_ttl_ms": 400, "max_task_retries": 1}})
async def test_without_backoff_failures_wait_in_the_original_delay_queue(worker, tmp_path):
    marker = tmp_path / "runs"
    state = await add_task(app.fail_until, str(marker), 100)

    await wait_for(lambda: _delayed(), what="the message in the original delay queue")
    final = await ended(state)
    assert final["job_retries"] == 1
    await settled((0, 0, 1))


async def _delayed() -> bool:
    return (await counts())[1] == 1


def test_tiers_are_fixed_and_never_shorter_than_asked():
    assert names.delay_tier_ms(0) == 100
    assert names.delay_tier_ms(400) == 400
    assert names.delay_tier_ms(401) == 476
    assert all(names.delay_tier_ms(ms) >= ms for ms in range(0, 200000, 97))
    assert all(names.delay_tier_ms(ms) < 1.2 * ms for ms in range(100, 200000, 97))
    assert names.delay_tier_ms(10**12) == names.DELAY_TIERS_MS[-1]  # capped below RabbitMQ's limit


async def test_an_explicit_retry_delay_uses_a_tier_declared_beside_the_original_queues(worker, tmp_path):
    settings = get_settings()
    queue, arguments = names.delay_tier(settings, 800)
    assert queue == f"{settings.queue}-delay-800ms"
    assert arguments == {
        "x-dead-letter-exchange": settings.exchange,
        "x-dead-letter-routing-key": settings.queue,
        "x-message-ttl": 800,
        "x-expires": 61600,
    }

    state = await add_task(app.steer, str(tmp_path / "runs"), "retry", 0.8)
    assert await state.result(timeout=60) == 2

    connection = AMQPConnection(settings)
    await connection.open(max_time=10)
    try:
        channel = await connection.channel()
        assert (await channel.queue_declare(queue, passive=True))["message_count"] == 0
        await declare_queues(channel, settings)  # the original queues' arguments are unchanged
    finally:
        await connection.close()
