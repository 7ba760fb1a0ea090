"""A countdown lives in the broker, so a broker restart neither loses nor advances it (docs/tasks.md).

Runs on the standalone node of scripts/ha-engines.sh (solo@localhost, AMQP 5704): the
machine's own node on 5672 serves every other test and is never restarted. `make test-ha`
starts it, runs tests/ha and stops it.
"""

import asyncio
import subprocess
import time

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.utils import lines, logged, queue_counts, running_worker

pytestmark = pytest.mark.usefixtures("outside_container")

NODE = "solo@localhost"
#: long enough for the node to stop and start again while the task still waits
COUNTDOWN = 30


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "-n", NODE, *args], check=True, timeout=120)


@pytest.mark.app_settings({"amqp": {"host": "127.0.0.1", "port": 5704}})
async def test_a_countdown_survives_a_broker_restart(guillotina_main, tmp_path, info_logs):
    marker = tmp_path / "ran"
    async with running_worker():
        state = await add_task(app.stamp, str(marker), _countdown=COUNTDOWN)
        eta = (await state.get_state())["eta"]

        # the task waits in a delay tier of this node; the worker stays up, reconnecting
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.to_thread(rabbitmqctl, "start_app")
        assert time.time() < eta, f"the node took longer than {COUNTDOWN}s to restart: test inconclusive"
        assert lines(marker) == []  # the restart did not advance it

        final = await state.join(timeout=COUNTDOWN + 60)

    assert logged(info_logs, "reconnected to RabbitMQ")  # the node really went away
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] >= eta  # not before its eta
    assert lines(marker) == ["ran"]  # once
    assert set((await queue_counts()).values()) == {0}  # and nothing left to run it again
