"""Liveness (docs/design.md#liveness): beacons, activity check and loop watchdog make a useless worker exit.

Real `g amqp-worker` processes; what the tests observe is their log, the
tasks they still run, and their exit codes (guillotina_amqp.liveness.EXIT_*).
"""

import asyncio
import contextlib
import json
import re
import time
import uuid

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.connection import AMQPConnection
from guillotina_amqp.liveness import EXIT_BEACON_LOST, EXIT_IDLE, EXIT_LOOP_BLOCKED
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import running_worker, wait_for


def verbose_config(**amqp: object) -> dict:
    """worker_config whose log shows each beacon and no-op probe (DEBUG of guillotina_amqp.liveness)."""
    config = worker_config(**amqp)
    config["logging"]["loggers"] = {"guillotina_amqp.liveness": {"level": "DEBUG"}}
    return config


async def wait_lines(worker: WorkerProcess, text: str, count: int, timeout: float = 60) -> None:
    """Until `text` appears `count` times in the worker's log (fails early if it exits)."""

    def enough() -> bool:
        if worker.returncode is not None:
            raise AssertionError(f"worker exited with {worker.returncode}:\n{worker.output}")
        return worker.output.count(text) >= count

    await wait_for(enough, timeout, f"{count} x {text!r}")


async def runs_a_task() -> bool:
    state = await add_task(app.add, 20, 22)
    final = await asyncio.wait_for(state.join(), 60)
    return final["status"] == TaskStatus.FINISHED and final["result"] == 42


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return out.decode()


async def rabbitmq_list(what: str, *columns: str) -> list[dict]:
    """`rabbitmqctl list_<what> <columns>` as a list of dicts."""
    out = await rabbitmqctl(f"list_{what}", *columns, "--formatter", "json")
    return json.loads(out[out.index("[") :])


def arguments(table: list) -> dict:
    """{name: value} of an AMQP table as rabbitmqctl's json shows it: [[name, type, value], ...]."""
    return {name: value for name, _type, value in table}


BEACON_BACK = "Beacon back on beacon-"


# -- beacons ------------------------------------------------------------------------


async def test_healthy_worker_keeps_beaconing_past_three_ttls(guillotina_main):
    ttl, more = 1, 5
    async with WorkerProcess(verbose_config(beaconttl=ttl)) as worker:
        await worker.wait_consuming()
        await wait_lines(worker, BEACON_BACK, 1)
        started = time.monotonic()
        first = worker.output.count(BEACON_BACK)  # read after `started`: beacon first+1 came later
        # each beacon waits beaconttl in the delay queue: 5 more of them take > 3 x beaconttl
        await wait_lines(worker, BEACON_BACK, first + more)
        last = worker.output.count(BEACON_BACK)  # read before `elapsed`: beacon `last` came earlier
        elapsed = time.monotonic() - started
        assert worker.returncode is None
        assert await runs_a_task()
    assert "not live" not in worker.output
    # beacon first+1 came after `started`, each later one >= ttl after the one before (RabbitMQ
    # keeps times in whole ms: allow 10 ms); with a TTL taken for ms they would all come at once
    assert elapsed >= (last - first - 1) * ttl - 0.01, (elapsed, first, last)


@pytest.mark.app_settings({"amqp": {"beaconttl": 1.5}})
async def test_beacon_queues_are_exclusive_to_the_worker_connection_and_delay_by_ttl(guillotina_main):
    async with running_worker() as worker:
        beacon = worker.beacon
        await wait_for(lambda: beacon.received >= 1, 30, "a first beacon back")
        queue, delay_queue = beacon.queue, beacon.delay_queue
        uid = re.fullmatch(r"beacon-(.+)", queue).group(1)
        uuid.UUID(uid)  # raises unless it is one
        assert delay_queue == f"beacon-delay-{uid}"

        queues = {
            found["name"]: found
            for found in await rabbitmq_list("queues", "name", "exclusive", "arguments", "owner_pid")
        }
        connections = await rabbitmq_list("connections", "pid", "client_properties")
        owner = [
            found["pid"]
            for found in connections
            if arguments(found["client_properties"]).get("connection_name") == worker.connection_name
        ]
        assert len(owner) == 1, connections
        assert queues[queue]["exclusive"] is True and queues[queue]["owner_pid"] == owner[0]
        assert arguments(queues[queue]["arguments"]) == {}
        assert queues[delay_queue]["exclusive"] is True and queues[delay_queue]["owner_pid"] == owner[0]
        assert arguments(queues[delay_queue]["arguments"]) == {
            "x-dead-letter-exchange": "beacon",
            "x-dead-letter-routing-key": queue,
            "x-message-ttl": 1500,  # milliseconds
        }
        exchanges = {
            found["name"]: found["type"] for found in await rabbitmq_list("exchanges", "name", "type")
        }
        assert exchanges["beacon"] == "direct"
        bindings = await rabbitmq_list("bindings", "source_name", "destination_name", "routing_key")
        for name in (queue, delay_queue):
            assert {"source_name": "beacon", "destination_name": name, "routing_key": name} in bindings

    async def gone() -> bool:
        names = {found["name"] for found in await rabbitmq_list("queues", "name")}
        return not names & {queue, delay_queue}

    await wait_for(gone, 30, "the beacon queues to go with the worker's connection")


async def test_worker_whose_beacon_stops_coming_back_exits(guillotina_main):
    async with WorkerProcess(verbose_config(beaconttl=1)) as worker:
        await worker.wait_consuming()
        await wait_lines(worker, BEACON_BACK, 1)
        beacon_queue = re.search(r"Beacons on (beacon-[0-9a-f]+)", worker.output).group(1)
        delay_queue = beacon_queue.replace("beacon-", "beacon-delay-", 1)
        # its next beacon has nowhere to go: published to a queue that no longer exists
        await rabbitmqctl("delete_queue", delay_queue)
        code = await worker.wait_exit(60)
    assert code == EXIT_BEACON_LOST, worker.output
    assert f"no beacon came back on {beacon_queue} within 3s" in worker.output


# -- activity check -------------------------------------------------------------------


async def test_idle_worker_gets_its_own_probe_back_from_a_crowded_queue(guillotina_main):
    """An idle worker's no-op probe must reach THAT worker, not just any consumer of the queue.

    Four more workers (in this process, no activity check of their own) share
    the queue: most probes land on them first and must be sent on to their sender.
    """
    config = verbose_config(noop_after=0.5, kill_after=3)
    async with contextlib.AsyncExitStack() as stack:
        others = [await stack.enter_async_context(running_worker(check_activity=False)) for _ in range(4)]
        worker = await stack.enter_async_context(WorkerProcess(config))
        await worker.wait_consuming()
        # a probe goes out only after noop_after idle seconds: 14 returns take > 2 x kill_after
        await wait_lines(worker, "no-op probe came back", 14)
        assert worker.returncode is None
        assert await runs_a_task()
        assert sum(other.probes_forwarded for other in others) > 0
    assert "not live" not in worker.output


@pytest.mark.app_settings({"amqp": {"noop_after": 0.3, "kill_after": 1.5}})
async def test_worker_whose_consumer_stopped_receiving_gives_up(guillotina_main):
    async with running_worker() as worker:
        await wait_for(lambda: worker.activity.probes_back >= 2, 30, "probes to come back")
        assert worker.exit_code is None
        # the consumer no longer receives, though connection and beacons are fine
        for consumer_tag in worker._consumer_tags:
            await worker._channel.basic_cancel(consumer_tag)
        await asyncio.wait_for(worker.failed.wait(), 30)
    assert worker.exit_code == EXIT_IDLE


@contextlib.asynccontextmanager
async def higher_priority_consumer():
    """A consumer RabbitMQ prefers to the worker's (x-priority): it takes every message, so the
    worker's own consumer, connection and beacons fine, receives nothing any more."""
    settings = get_settings()
    connection = AMQPConnection(settings)
    await connection.open(max_time=10)
    try:
        channel = await connection.channel()

        async def take(channel, body, envelope, properties) -> None:
            pass  # no_ack: taken and dropped, never sent on

        await channel.basic_consume(
            take, queue_name=settings.queue, no_ack=True, arguments={"x-priority": 10}
        )
        yield
    finally:
        await connection.close()


async def test_worker_process_whose_consumer_receives_nothing_exits_with_code_4(guillotina_main):
    async with WorkerProcess(verbose_config(noop_after=0.5, kill_after=2.5)) as worker:
        await worker.wait_consuming()
        await wait_lines(worker, "no-op probe came back", 1)  # healthy while it gets its probes
        async with higher_priority_consumer():
            code = await worker.wait_exit(60)
    assert code == EXIT_IDLE, worker.output
    assert "not even its own no-op probe" in worker.output


# -- loop watchdog ----------------------------------------------------------------------


async def test_task_blocking_the_loop_gets_the_worker_killed(guillotina_main):
    async with WorkerProcess(worker_config(), "--auto-kill-timeout", "2") as worker:
        await worker.wait_consuming()
        await add_task(app.blocking_sleep, 120)
        code = await worker.wait_exit(60)
    assert code == EXIT_LOOP_BLOCKED, worker.output
    assert "Event loop blocked for" in worker.output


async def test_idle_worker_with_a_watchdog_stays_up(guillotina_main):
    async with WorkerProcess(verbose_config(beaconttl=1), "--auto-kill-timeout", "2") as worker:
        await worker.wait_consuming()
        # the watchdog says so as it starts, which may be just after "consuming"
        await wait_for(lambda: "exits if the event loop blocks for 2s" in worker.output, what="the watchdog")
        # beacons are a clock: 5 round trips of >= 1 s each, well past the 2 s timeout
        await wait_lines(worker, BEACON_BACK, 5)
        assert worker.returncode is None
        assert await runs_a_task()
