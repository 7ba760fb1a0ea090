"""Named queues: `_queue=`, `@task(queue=)` and `g amqp-worker --queue` (docs/tasks.md#named-queues)."""

from typing import Any

import pytest

from guillotina_amqp import add_task, names, queues, task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.test_context import enter_container
from tests.test_contract import TTLS, assert_spec_topology, broker, counts_are
from tests.utils import all_empty, lines, running_worker, wait_for

pytestmark = pytest.mark.usefixtures("outside_container")

#: decorating registers a function (for good, in this process): use one @task registered already,
#: so that tests of the allowlist still see their functions unregistered
REGISTERED = app.decorated_add.func


@pytest.fixture
async def named(namespace):
    """Two queue names of this test's own ("A" and "B"); their queues are deleted afterwards."""
    queues = {"A": f"test-{namespace}.a", "B": f"test-{namespace}.b"}
    yield queues
    async with broker() as protocol:
        channel = await protocol.channel()
        for queue in [*queues.values(), *map(names.priority_queue, queues.values())]:
            for name in (queue, names.delay_queue(queue), names.error_queue(queue)):
                await channel.queue_delete(name)


async def waiting(queue: str, count: int) -> bool:
    """Whether `count` messages wait in `queue` and none in its delay and error queues."""
    async with broker() as protocol:
        return await counts_are(protocol, {queue: count, f"{queue}-delay": 0, f"{queue}-error": 0})


async def status(state: TaskState) -> str:
    return await state.get_status()


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "non-empty"),
        ("has space", "characters outside"),
        ("é", "characters outside"),
        ("x" * 250, "longer than 227 bytes"),
        ("amq.mine", "reserves"),
        ("reports-delay", "delay, error or priority"),
        ("reports-priority", "delay, error or priority"),
        (5, "non-empty string"),
    ],
)
async def test_a_queue_name_rabbitmq_would_refuse_is_refused_at_the_call(guillotina_main, name, problem):
    with pytest.raises(ValueError, match=problem):
        await add_task(app.noop, _queue=name, _task_id="refused")
    with pytest.raises(ValueError, match=problem):
        task(REGISTERED, queue=name)
    # nothing published, nothing recorded
    assert await all_empty()
    with pytest.raises(KeyError):
        await TaskState("refused").get_state()


@TTLS
async def test_a_named_queue_gets_the_spec_topology_under_its_own_name(guillotina_main, named):
    settings = get_settings()
    await add_task(app.noop, _queue=named["A"])
    async with running_worker(queues=[named["B"]]), broker() as protocol:
        for queue in named.values():  # declared by add_task, and by the worker
            await assert_spec_topology(protocol, settings.exchange, queue)
    assert await waiting(named["A"], 1)
    assert await all_empty()  # the default queues got nothing


async def test_decorated_task_goes_to_its_queue_and_only_its_workers_run_it(guillotina_main, named):
    definition = task(REGISTERED, queue=named["A"])
    state = await definition(1, 2)
    assert (await state.get_state())["status"] == TaskStatus.SCHEDULED

    async with running_worker() as default_worker:  # consumes amqp.queue only
        control = await add_task(app.noop)
        await control.join()
        assert default_worker.total_run == 1
    assert await status(state) == TaskStatus.SCHEDULED
    assert await waiting(named["A"], 1)

    async with running_worker(queues=[named["A"]]):
        final = await state.join()
    assert final["status"] == TaskStatus.FINISHED
    assert final["result"] == 3
    assert final["job_data"]["queue"] == named["A"]


async def test_a_worker_announces_the_queues_it_consumes(guillotina_main, named):
    async with running_worker(queues=[named["A"], named["B"]]) as worker:
        await worker.presence.announce()
        [announced] = await worker.state_manager.workers()
    assert announced["queue"] == f"{named['A']}, {named['B']}"


async def test_a_call_overrides_the_decorators_queue(guillotina_main, named):
    definition = task(REGISTERED, queue=named["A"])
    state = await definition(1, 2, _queue=named["B"])
    assert await waiting(named["B"], 1)
    async with running_worker(queues=[named["B"]]):
        assert (await state.join())["result"] == 3


async def test_rest_lists_a_task_waiting_in_a_named_queue(container_requester, named):
    async with container_requester as requester:
        await enter_container(requester)
        state = await add_task(app.noop, _queue=named["A"])

        listed, code = await requester("GET", "/db/guillotina/@amqp-tasks")
        assert code == 200
        assert listed == [state.task_id]
        shown, code = await requester("GET", f"/db/guillotina/@amqp-tasks/{state.task_id}")
        assert code == 200
        assert shown["status"] == TaskStatus.SCHEDULED


@pytest.mark.app_settings({"amqp": {"max_task_retries": 3}})
async def test_task_for_queue_a_waits_for_a_worker_of_a_and_its_retry_comes_back_to_a(
    guillotina_main, named, tmp_path
):
    on_a, on_b, on_default = tmp_path / "a", tmp_path / "b", tmp_path / "default"
    config = worker_config()
    # a task of A failing once: its retry must come back to A, the only queue its worker takes
    state_a = await add_task(app.fail_until, str(on_a), 1, _queue=named["A"])

    async with WorkerProcess(config, "--queue", named["B"]) as worker:
        await worker.wait_consuming()
        state_b = await add_task(app.write_marker, str(on_b), _queue=named["B"])
        assert (await state_b.join())["status"] == TaskStatus.FINISHED
        # B's worker ran a task sent after A's: A's never reached it
        assert await status(state_a) == TaskStatus.SCHEDULED
        assert await waiting(named["A"], 1)
    assert lines(on_a) == []

    state_default = await add_task(app.write_marker, str(on_default))
    async with WorkerProcess(config, "--queue", named["A"]):
        final = await wait_for(lambda: _finished(state_a), timeout=60, what="A's task to finish on its retry")
        assert final["job_retries"] == 1
        assert final["result"] == 2  # its second run
        assert lines(on_a) == ["ran", "ran"]
        assert await waiting(named["A"], 0)
        # nor does A's worker take the default queue's task
        assert await status(state_default) == TaskStatus.SCHEDULED

    second_b = await add_task(app.write_marker, str(on_b), _queue=named["B"])
    async with WorkerProcess(config, "--queue", "default", "--queue", named["B"]):
        assert (await state_default.join())["status"] == TaskStatus.FINISHED
        assert (await second_b.join())["status"] == TaskStatus.FINISHED
        # (acked just after the state is written: wait for it before the worker is killed)
        await wait_for(all_empty, what="the default queues to be empty")


async def _finished(state: TaskState) -> dict | None:
    found = await state.get_state()
    return found if found["status"] == TaskStatus.FINISHED else None


async def test_worker_refuses_a_bad_queue_name_at_start(guillotina_main):
    async with WorkerProcess(worker_config(), "--queue", "has space") as worker:
        assert await worker.wait_exit() == 2
    assert "characters outside" in worker.output


async def test_rest_shows_the_queues_workers_consume_and_those_asked_for(container_requester, named):
    async with container_requester as requester, running_worker(queues=[named["B"]]) as worker:
        await worker.presence.announce()
        await add_task(app.noop, _queue=named["A"])  # no worker takes A: it waits there

        body, code = await requester("GET", "/db/guillotina/@amqp-queues")
        assert code == 200
        depths = {queue["queue"]: queue["messages"] for queue in body["queues"]}
        assert depths[named["B"]] == 0 and depths[names.error_queue(named["B"])] == 0
        assert named["A"] not in depths

        body, code = await requester("GET", f"/db/guillotina/@amqp-queues?queue={named['A']}")
        assert code == 200
        depths = {queue["queue"]: queue["messages"] for queue in body["queues"]}
        assert depths[named["A"]] == 1 and depths[get_settings().queue] == 0

        body, code = await requester("GET", "/db/guillotina/@amqp-queues?queue=has%20space")
        assert code == 400 and "characters outside" in body["reason"]


async def test_dead_letters_of_a_named_queue_and_of_its_priority_queue_go_back_where_they_died(
    guillotina_main, named
):
    settings, queue = get_settings(), named["B"]

    async def dead() -> list[str]:
        found = await queues.dead_letters(settings, queue=queue)
        return sorted(letter.describe()["task_id"] for letter in found)

    async with running_worker(no_retries=True, queues=[queue]):
        plain = await add_task(app.fail, "plain", _queue=queue)
        urgent = await add_task(app.fail, "urgent", _queue=queue, _priority=5)
        for state in (plain, urgent):
            assert (await state.join())["status"] == TaskStatus.ERRORED
        # a dead letter is moved just after its state is written: the worker must live till then
        expected = sorted([plain.task_id, urgent.task_id])
        await wait_for(lambda: _equal(dead(), expected), what="both dead letters")
    assert await queues.dead_letters(settings) == []  # amqp.queue's error queue has none of them

    done = await queues.requeue(settings, queue=queue)
    assert len(done.moved) == 2 and done.refused == []
    back = {queue: 1, names.priority_queue(queue): 1, names.error_queue(names.priority_queue(queue)): 0}
    async with broker() as protocol:
        await wait_for(lambda: counts_are(protocol, back), what="each dead letter back where it died")
    assert await queues.purge(settings, queue) == 0


async def _equal(found: Any, expected: Any) -> bool:
    return await found == expected
