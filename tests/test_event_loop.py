"""The loop a test runs on is the loop guillotina's app (and its async utilities) run on.

guillotina 7's fixtures define their own `event_loop` and hand it to make_app();
pytest-asyncio 0.21 honours that fixture. If the two loops ever differ, tasks
scheduled by the app (async utilities, the Redis listener, worker tasks) would
never run while the test awaits.
"""

import asyncio

import pytest
from guillotina.component import get_utility

from guillotina_amqp.settings import get_settings
from tests.app import FlagUtility, IFlagUtility
from tests.utils import wait_for

FLAG_UTILITY = {
    "load_utilities": {
        "amqp-test-flag": {
            "provides": "tests.app.IFlagUtility",
            "factory": "tests.app.FlagUtility",
        }
    }
}


async def test_test_runs_on_the_apps_loop(guillotina_main, event_loop):
    assert asyncio.get_running_loop() is event_loop
    assert guillotina_main.loop is event_loop


@pytest.mark.app_settings(FLAG_UTILITY)
async def test_async_utility_initialize_is_awaited_on_the_test_loop(guillotina_main):
    utility = get_utility(IFlagUtility)
    assert isinstance(utility, FlagUtility)
    await wait_for(lambda: utility.initialized, timeout=10, what="FlagUtility.initialize() to run")
    assert utility.loop is asyncio.get_running_loop()


@pytest.mark.parametrize("run", [1, 2])
@pytest.mark.app_settings({"amqp": {"max_task_retries": 1}})
async def test_each_parametrized_test_gets_its_own_namespace(guillotina_main, namespace, run):
    """An app_settings mark is shared by a test's parametrizations: it must not carry the first's queue."""
    settings = get_settings()
    assert settings.queue == f"test-{namespace}"
    assert settings.redis_prefix_key == f"test-{namespace}-"
    assert settings.max_task_retries == 1
