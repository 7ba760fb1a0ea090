"""The HA topology (docs/operations.md) on real engines: a RabbitMQ node and the Redis master die.

Needs the engines of scripts/ha-engines.sh (ports below); `make test-ha` starts them,
runs this module and stops them. Nodes are killed with SIGKILL, as a crash would.
"""

import asyncio
import os
import signal
import subprocess

import pytest
from redis.asyncio import Redis

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.utils import lines, queue_counts, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container", "info_logs")

HA_DIR = os.environ.get("HA_DIR", "/tmp/guillotina-amqp-ha")
NODES = {5701: "ha1", 5702: "ha2", 5703: "ha3"}
CLUSTER = [f"127.0.0.1:{port}" for port in NODES]
SENTINELS = ["127.0.0.1:26391", "127.0.0.1:26392", "127.0.0.1:26393"]
MASTER_NAME = "ha-master"
PREFETCH = 20

TASKS = 2000
ON_THE_CLUSTER = pytest.mark.app_settings(
    {"amqp": {"hosts": CLUSTER, "queue_type": "quorum", "max_running_tasks": PREFETCH, "heartbeat": 5}}
)


async def schedule(task, first: int, end: int) -> list[TaskState]:
    """task(i) for i in first..end-1; concurrent publishes share confirms, 100 at a time."""
    states: list[TaskState] = []
    for start in range(first, end, 100):
        states += await asyncio.gather(*(task(i) for i in range(start, min(start + 100, end))))
    return states


def kill(pidfile: str) -> int:
    with open(pidfile) as fh:
        pid = int(fh.read().strip())
    os.kill(pid, signal.SIGKILL)
    return pid


async def statuses(states: list[TaskState]) -> list[str]:
    found = []
    for start in range(0, len(states), 100):
        chunk = states[start : start + 100]
        found += [s["status"] for s in await asyncio.gather(*(st.get_state() for st in chunk))]
    return found


def test_engines_run_on_their_own_ports():
    """The machine's own RabbitMQ node is not part of the test cluster."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "-n", "ha1@localhost", "cluster_status", "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "rabbit@localhost" not in out and all(f"{node}@localhost" in out for node in NODES.values())


# -- RabbitMQ: a quorum queue on three nodes, one killed -------------------------------


@ON_THE_CLUSTER
async def test_killing_the_node_a_worker_uses_loses_no_task(guillotina_main, tmp_path):
    async def sleep_then_mark(i: int) -> TaskState:
        return await add_task(app.sleep_then_mark, str(tmp_path / str(i)), 0.1)

    async with running_worker() as victim, running_worker() as other:
        states = await schedule(sleep_then_mark, 0, TASKS // 2)
        await wait_for(lambda: victim.total_run + other.total_run >= TASKS // 5, timeout=300, what="work")

        # Given a worker consuming from one node, when that node dies while tasks run
        address = victim.connection.address
        kill(f"{HA_DIR}/rabbit/{NODES[int(address.split(':')[1].split('/')[0])]}/beam.pid")
        # (and more are published meanwhile: the publisher fails over too if it used that node)
        states += await schedule(sleep_then_mark, TASKS // 2, TASKS)

        # then it fails over to another node, and every task ends
        await wait_for(lambda: victim.connection.address != address, timeout=60, what="fail-over")
        await wait_for(lambda: _all_finished(states), timeout=600, what="every task to finish")
        await wait_for(lambda: _queues_empty(), timeout=120, what="redeliveries to settle")
        assert victim.connection.is_open

    runs = [lines(tmp_path / str(i)).count("done") for i in range(TASKS)]
    assert min(runs) == 1  # none lost
    # duplicates only around the kill: at most what the dead connection had unacked
    assert max(runs) <= 2 and runs.count(2) <= PREFETCH


async def _all_finished(states: list[TaskState]) -> bool:
    return set(await statuses(states)) == {TaskStatus.FINISHED}


async def _queues_empty() -> bool:
    return set((await queue_counts()).values()) == {0}


# -- Redis: master, replica and three Sentinels; the master killed ------------------------

WITH_SENTINELS = pytest.mark.app_settings({"redis": {"sentinels": SENTINELS, "master_name": MASTER_NAME}})


async def master_port() -> int:
    sentinel = Redis(host="127.0.0.1", port=int(SENTINELS[0].split(":")[1]))
    try:
        _, port = await sentinel.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return int(port)
    finally:
        await sentinel.aclose()


@WITH_SENTINELS
async def test_killing_the_redis_master_loses_no_state(guillotina_main):
    async def sleep(i: int) -> TaskState:
        return await add_task(app.sleep, 0.05)

    async with running_worker() as worker:
        states = await schedule(sleep, 0, 500)
        await wait_for(lambda: worker.total_run >= 100, timeout=300, what="work")

        # Given tasks running, when the Redis master dies
        assert await master_port() == 6391
        kill(f"{HA_DIR}/redis/master.pid")

        # then Sentinel promotes the replica, the worker follows, every task ends
        await wait_for(lambda: _promoted(), timeout=120, what="Sentinel to promote the replica")
        # and every state is readable on the new master, finished
        await wait_for(lambda: _all_finished(states), timeout=600, what="every task to finish")
        await wait_for(lambda: _queues_empty(), timeout=120, what="redeliveries to settle")


async def _promoted() -> bool:
    return await master_port() == 6392
