"""A worker configured by environment variables alone, as in a container (docs/settings.md).

guillotina reads `G_AMQP__MAX_TASK_RETRIES=1` into `amqp.max_task_retries` as the
string "1"; the worker must read it as the number, and stop at start-up, naming
the variable, when a value cannot be read.
"""

import pytest

from guillotina_amqp.liveness import EXIT_STARTUP_FAILED
from guillotina_amqp.state import TaskStatus
from guillotina_amqp.utils import add_task
from tests import app
from tests.subprocess_worker import WorkerProcess, environment, worker_config
from tests.test_settings_errors import assert_one_clear_line, failed_start
from tests.utils import queue_counts, wait_for


async def test_a_worker_configured_by_environment_alone_runs_tasks(guillotina_main, tmp_path):
    # Given no configuration file, every setting (numbers, none, lists) in G_ variables as text
    config = worker_config(max_task_retries=1)
    env = environment(config)
    assert env["G_AMQP__MAX_TASK_RETRIES"] == "1" and env["G_AMQP__ALLOWED_TASKS"] == "none"
    async with WorkerProcess(None, env=env) as worker:
        await worker.wait_consuming()
        # then it consumes this test's queue (not the default "guillotina")
        assert f"consuming {config['amqp']['queue']} (prefetch 20" in worker.output

        # and runs tasks
        assert (await (await add_task(app.add, 1, 2)).join())["result"] == 3

        # and counts retries against the number 1 (the text "1" would not compare)
        marker = tmp_path / "runs"
        failing = await add_task(app.fail_until, str(marker), 100)
        error_queue = f"{config['amqp']['queue']}-error"
        await wait_for(lambda: _in(error_queue), timeout=60, what="the message in the error queue")
        final = await failing.get_state()
        assert final["status"] == TaskStatus.ERRORED
        assert final["job_retries"] == 1
        assert len(marker.read_text().splitlines()) == 2  # the run and one retry
        assert worker.returncode is None


async def _in(queue: str) -> bool:
    return (await queue_counts())[queue] == 1


#: variable, bad value, what the one line must say (the setting, besides the variable)
BAD = {
    "retries-not-a-number": ("G_AMQP__MAX_TASK_RETRIES", "three", "amqp.max_task_retries"),
    "port-not-a-number": ("G_AMQP__PORT", "fifty", "amqp.port"),
    "beacon-not-a-number": ("G_AMQP__BEACONTTL", "soon", "amqp.beaconttl"),
    "keys-not-a-list": ("G_AMQP__PREVIOUS_SIGNING_KEYS", "old-key-secret", "amqp.previous_signing_keys"),
    "list-not-json": ("G_AMQP__ALLOWED_TASKS", "tests.app", "amqp.allowed_tasks"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_value_that_cannot_be_read_stops_the_worker_naming_the_variable(guillotina_main, case):
    variable, value, setting = BAD[case]
    env = {**environment(worker_config()), variable: value}
    code, output = await failed_start(None, env=env)
    assert code == EXIT_STARTUP_FAILED, output
    assert_one_clear_line(output, [variable, setting])
    assert "key-secret" not in output


async def test_a_configuration_port_that_is_not_a_number_stops_a_metrics_worker(guillotina_main):
    env = {**environment(worker_config()), "G_PORT": "eighty"}
    code, output = await failed_start(None, "--metrics-server", env=env)
    assert code == EXIT_STARTUP_FAILED, output
    assert_one_clear_line(output, ["G_PORT", "port", "must be an integer"])


async def test_a_value_guillotina_cannot_parse_as_json_stops_the_worker(guillotina_main):
    # guillotina itself reads a value starting with [ or { as JSON, before any add-on runs:
    # the worker never starts (guillotina's traceback names the JSON error, not the variable)
    env = {**environment(worker_config()), "G_AMQP__ALLOWED_TASKS": '["tests.app"'}
    code, output = await failed_start(None, env=env)
    assert code != 0, output
    assert "JSONDecodeError" in output
    assert "consuming" not in output
