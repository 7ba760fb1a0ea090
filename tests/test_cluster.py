"""Beyond one machine (docs/operations.md) on the machine's own RabbitMQ: quorum queues, `amqp.hosts`.

The cluster itself (a node killed while tasks run, a Redis failover) is in tests_ha/,
run by `make test-ha`.
"""

import asyncio
import os

import pytest
from guillotina import app_settings

from guillotina_amqp import add_task
from guillotina_amqp.exceptions import InvalidSettings
from guillotina_amqp.publishing import get_publisher
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskStatus, redis_client
from tests import app
from tests.test_faults import close_connection, rabbitmqctl, reconnected
from tests.utils import publish_raw, queue_counts, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")

RABBITMQ = os.environ["RABBITMQ"]
QUORUM = pytest.mark.app_settings({"amqp": {"queue_type": "quorum", "max_task_retries": 1}})


async def queue_types() -> dict[str, str]:
    """Queue name -> type ("classic", "quorum") of this test's queues."""
    queue = app_settings["amqp"]["queue"]
    listing = await rabbitmqctl("list_queues", "name", "type")
    found = dict(line.split("\t") for line in listing.splitlines() if line.startswith(queue))
    return found


@QUORUM
async def test_quorum_queues_run_retry_and_dead_letter_like_classic_ones(worker):
    queue = app_settings["amqp"]["queue"]
    assert await queue_types() == {
        f"{queue}-quorum": "quorum",
        f"{queue}-quorum-delay": "quorum",
        f"{queue}-quorum-error": "quorum",
    }

    done = await asyncio.wait_for((await add_task(app.add, 2, 3)).join(), 60)
    failing = await add_task(app.fail, "always")
    await publish_raw(b"not a task")  # poison: straight to the error queue
    # the retry goes through the delay queue, the last failure into the error queue
    await wait_for(lambda: _counts_are([0, 0, 2]), timeout=60, what="the error queue to hold both")

    assert (done["status"], done["result"]) == (TaskStatus.FINISHED, 5)
    failed = await failing.get_state()
    assert (failed["status"], failed["job_retries"]) == (TaskStatus.ERRORED, 1)


@QUORUM
async def test_quorum_delay_tiers_are_quorum_queues(worker):
    """A countdown (and a backed-off retry) waits in a delay tier: replicated like the rest."""
    queue = app_settings["amqp"]["queue"]
    final = await asyncio.wait_for((await add_task(app.add, 1, 2, _countdown=0.5)).join(), 60)
    assert final["result"] == 3
    tiers = {name: kind for name, kind in (await queue_types()).items() if "delay-" in name}
    assert tiers and set(tiers.values()) == {"quorum"}, tiers
    # named apart from the classic tiers a classic worker may still use during the switch
    assert all(name.startswith(f"{queue}-quorum-qdelay-") for name in tiers)


async def _counts_are(expected: list[int]) -> bool:
    return list((await queue_counts()).values()) == expected


async def test_classic_and_quorum_queues_coexist_while_migrating(guillotina_main):
    """The migration of docs/operations.md: quorum workers and publishers start on their own queues
    while classic workers drain the old ones; neither declaration refuses the other."""
    waiting = await add_task(app.add, 1, 1)  # scheduled before the switch, no worker yet

    app_settings["amqp"]["queue_type"] = "quorum"
    async with running_worker():
        after = await asyncio.wait_for((await add_task(app.add, 2, 2)).join(), 60)
        assert after["result"] == 4
        assert await waiting.get_status() == TaskStatus.SCHEDULED  # still in the classic queue

    app_settings["amqp"]["queue_type"] = "classic"
    async with running_worker():
        drained = await asyncio.wait_for(waiting.join(), 60)
    assert drained["result"] == 2
    assert set((await queue_types()).values()) == {"classic", "quorum"}


@pytest.mark.app_settings({"amqp": {"host": "127.0.0.1", "port": 1, "hosts": ["127.0.0.1:2", RABBITMQ]}})
async def test_worker_and_publisher_connect_to_the_live_broker_of_hosts(worker):
    state = await add_task(app.add, 3, 4)
    final = await asyncio.wait_for(state.join(), 60)

    assert final["result"] == 7
    assert worker.connection.address == f"{RABBITMQ}/"


# two addresses of the same broker: a fail-over without a cluster
TWO_ADDRESSES = ["127.0.0.1:" + RABBITMQ.rpartition(":")[2], "localhost:" + RABBITMQ.rpartition(":")[2]]


@pytest.mark.app_settings({"amqp": {"hosts": TWO_ADDRESSES}})
async def test_worker_fails_over_to_the_next_host_and_consumes_there(worker, caplog):
    first = worker.connection.address
    old = await close_connection(worker.connection_name)
    await wait_for(lambda: reconnected(worker.connection_name, old), timeout=60, what="a new connection")

    assert worker.connection.address != first
    final = await asyncio.wait_for((await add_task(app.add, 5, 5)).join(), 60)
    assert final["result"] == 10


@pytest.mark.parametrize(
    "block, named",
    [
        ({"queue_type": "stream"}, "amqp.queue_type"),
        ({"hosts": "127.0.0.1:5672"}, "amqp.hosts"),
        ({"hosts": ["127.0.0.1:amqp"]}, "amqp.hosts"),
        ({"hosts": [["127.0.0.1", 5672]]}, "amqp.hosts"),
    ],
)
def test_bad_cluster_settings_raise_naming_the_setting(guillotina_main, block, named):
    app_settings["amqp"].update(block)
    with pytest.raises(InvalidSettings, match=named):
        get_settings()


@pytest.mark.app_settings({"amqp": {"hosts": ["rabbit-a:5672", "rabbit-b", "10.0.0.3:5673"], "port": 5671}})
def test_hosts_default_to_amqp_port(guillotina_main):
    assert get_settings().addresses() == [("rabbit-a", 5672), ("rabbit-b", 5671), ("10.0.0.3", 5673)]


@pytest.mark.app_settings({"amqp": {"hosts": TWO_ADDRESSES}})
async def test_publisher_fails_over_to_the_next_host(guillotina_main):
    await add_task(app.noop)
    publisher = get_publisher(get_settings())
    first = publisher.connection.address
    old = await close_connection(publisher.connection.name)
    await wait_for(lambda: reconnected(publisher.connection.name, old), timeout=60, what="a new connection")

    state = await add_task(app.noop)

    assert publisher.connection.address != first
    assert await state.get_status() == TaskStatus.SCHEDULED
    assert list((await queue_counts()).values()) == [2, 0, 0]


@pytest.mark.parametrize("sentinels", ["127.0.0.1:26379", ["127.0.0.1"], [["127.0.0.1", 26379]]])
def test_bad_sentinels_raise_naming_the_setting(sentinels):
    with pytest.raises(InvalidSettings, match="redis.sentinels"):
        redis_client.sentinel_addresses({"sentinels": sentinels})
