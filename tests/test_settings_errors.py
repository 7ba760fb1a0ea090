"""`g amqp-worker` with bad settings: one clear line naming what to fix, and a non-zero exit.

A supervisor restarts a worker that exits non-zero; an operator reading its log
must see which setting or address is wrong, not just a traceback.
"""

from typing import Any, Callable

import pytest

from tests.subprocess_worker import WorkerProcess, worker_config

STARTUP_FAILED = "amqp-worker could not start"


def _unknown_manager(config: dict) -> None:
    config["amqp"]["persistent_manager"] = "nosuch"


def _redis_app_missing(config: dict) -> None:
    config["amqp"]["persistent_manager"] = "redis"
    config["applications"] = [a for a in config["applications"] if a != "guillotina.contrib.redis"]
    config.pop("redis")


def _redis_unreachable(config: dict) -> None:
    config["amqp"]["persistent_manager"] = "redis"
    config["redis"] = {"host": "127.0.0.1", "port": 1}


def _amqp_block_null(config: dict) -> None:
    # loading the add-on brings every default (a missing block is the defaults, see
    # test_settings_env.py); `amqp: null` is how a configuration removes the block
    config["amqp"] = None


def _previous_keys_as_string(config: dict) -> None:
    config["amqp"]["signing_key"] = "current-key-secret"
    config["amqp"]["previous_signing_keys"] = "old-key-secret"


def _allowed_tasks_as_string(config: dict) -> None:
    config["amqp"]["allowed_tasks"] = "tests.app"


def _empty_signing_key(config: dict) -> None:
    config["amqp"]["signing_key"] = ""


def _unknown_queue_type(config: dict) -> None:
    config["amqp"]["queue_type"] = "stream"


def _sentinels_as_string(config: dict) -> None:
    config["amqp"]["persistent_manager"] = "redis"
    config["redis"]["sentinels"] = "127.0.0.1:26379"


CASES: dict[str, tuple[Callable[[dict], None], list[str]]] = {
    "unknown-manager": (_unknown_manager, ["amqp.persistent_manager", "nosuch"]),
    "redis-app-missing": (_redis_app_missing, ["amqp.persistent_manager", "guillotina.contrib.redis"]),
    "redis-unreachable": (_redis_unreachable, ["Redis", "127.0.0.1:1", "redis.host"]),
    "amqp-block-null": (_amqp_block_null, ["'amqp' block"]),
    "previous-keys-string": (_previous_keys_as_string, ["amqp.previous_signing_keys"]),
    "allowed-tasks-string": (_allowed_tasks_as_string, ["amqp.allowed_tasks"]),
    "empty-signing-key": (_empty_signing_key, ["amqp.signing_key"]),
    "unknown-queue-type": (_unknown_queue_type, ["amqp.queue_type", "stream"]),
    "sentinels-string": (_sentinels_as_string, ["redis.sentinels"]),
}


async def failed_start(
    config: dict | None, *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> tuple[int, str]:
    """Start a worker expected to stop at start-up: its exit code and output."""
    worker = WorkerProcess(config, *args, env=env)
    try:
        worker.start()
        code = await worker.wait_exit(timeout)
    finally:
        worker.stop()
    return code, worker.output


def assert_one_clear_line(output: str, names: list[str]) -> None:
    lines = [line for line in output.splitlines() if STARTUP_FAILED in line]
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0], (name, output)
    assert "Traceback" not in output, output
    assert "consuming" not in output


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_setting_stops_the_worker_with_a_clear_line(guillotina_main, case):
    change, names = CASES[case]
    config: dict[str, Any] = worker_config()
    change(config)
    code, output = await failed_start(config)
    assert code != 0, output
    assert_one_clear_line(output, names)
    assert "RabbitMQ" not in output, "the broker was fine: blame the setting, not the broker"
    # a signing key never shows up in the logs
    assert "key-secret" not in output


async def test_unreachable_broker_stops_the_worker_naming_its_address(guillotina_main):
    # the worker keeps trying to connect for a minute (a broker may start after it)
    code, output = await failed_start(worker_config(host="127.0.0.1", port=1), timeout=180)
    assert code != 0, output
    assert_one_clear_line(output, ["RabbitMQ", "127.0.0.1:1", "amqp.host"])


async def test_good_settings_start_consuming(guillotina_main):
    """The same harness with valid settings consumes, so the failures above are the settings'."""
    async with WorkerProcess(worker_config(signing_key="k", previous_signing_keys=["old"])) as worker:
        await worker.wait_consuming()
        assert STARTUP_FAILED not in worker.output
