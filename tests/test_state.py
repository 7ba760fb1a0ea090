"""One contract suite for both state managers (docs/design.md#state-in-redis), plus Redis-only resilience.

Every contract test runs against the memory and the Redis manager: whatever a
worker or the REST API observes must not depend on which one is configured.
"""

import asyncio
import contextlib
import uuid
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from guillotina_amqp.exceptions import TaskAccessUnauthorized, TaskAlreadyAcquired
from guillotina_amqp.state import StateManager, TaskState, TaskStatus, get_state_manager
from guillotina_amqp.state.manager import CANCELED, CLAIMED, DONE, LOCKED
from guillotina_amqp.state.memory import MemoryStateManager
from guillotina_amqp.state.redis import RedisStateManager, _Notifier
from tests.own_redis import OWN_REDIS, OwnRedis
from tests.utils import wait_for

BOTH = pytest.mark.parametrize("manager", ["memory", "redis"])
MANAGER_CLASSES = {"memory": MemoryStateManager, "redis": RedisStateManager}
OTHER_WORKER = "another-worker"
JOB = {"func": "tests.app.add", "args": [1, 2], "kwargs": {}}


def new_id(container: str = "c") -> str:
    return f"task:db-{container}-{uuid.uuid4()}"


@pytest.fixture
async def state(guillotina_main: Any, manager: str) -> StateManager:
    found = get_state_manager()
    assert type(found) is MANAGER_CLASSES[manager]
    return found


@contextlib.contextmanager
def as_worker(state: StateManager, worker_id: str) -> Iterator[None]:
    """Act as another worker: the managers tell owners apart by `worker_id` only."""
    saved, state.worker_id = state.worker_id, worker_id
    try:
        yield
    finally:
        state.worker_id = saved


# -- state dicts ------------------------------------------------------------------


@BOTH
async def test_update_merges_and_get_returns_the_merge(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.SCHEDULED, "job_retries": 0})
    await state.update(task_id, {"status": TaskStatus.RUNNING, "eventlog": [["t", "x"]]})
    assert await state.get(task_id) == {
        "status": TaskStatus.RUNNING,
        "job_retries": 0,
        "eventlog": [["t", "x"]],
    }


@BOTH
async def test_unknown_task_is_empty_and_does_not_exist(state, manager):
    task_id = new_id()
    assert await state.get(task_id) == {}
    assert await state.exists(task_id) is False
    await state.update(task_id, {"status": TaskStatus.SCHEDULED})
    assert await state.exists(task_id) is True


@BOTH
@pytest.mark.parametrize("value", [0, "", [], {}, False, None, 0.0])
async def test_falsy_values_read_back_as_stored(state, manager, value):
    task_id = new_id()
    await state.update(task_id, {"result": value, "eventlog": []})
    found = await state.get(task_id)
    assert found == {"result": value, "eventlog": []}
    assert type(found["result"]) is type(value)
    assert type(found["eventlog"]) is list


@BOTH
async def test_reads_are_copies(state, manager):
    task_id = new_id()
    await state.update(task_id, {"eventlog": [["t", "x"]], "job_data": {"args": [1]}})
    found = await state.get(task_id)
    found["eventlog"].append(["t", "y"])
    found["job_data"]["args"].append(2)
    assert await state.get(task_id) == {"eventlog": [["t", "x"]], "job_data": {"args": [1]}}


@BOTH
async def test_unserializable_value_is_refused_and_changes_nothing(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.RUNNING})
    with pytest.raises(TypeError):
        await state.update(task_id, {"status": TaskStatus.FINISHED, "result": object()})
    assert await state.get(task_id) == {"status": TaskStatus.RUNNING}


@BOTH
async def test_update_without_fields_creates_nothing(state, manager):
    task_id = new_id()
    await state.update(task_id, {})
    assert not await state.exists(task_id)
    assert [t async for t in state.list()] == []


@BOTH
async def test_update_with_ttl_expires(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.FINISHED}, ttl=1)
    assert await state.exists(task_id)
    await wait_for(lambda: _not(state.exists(task_id)), timeout=15, what="the state to expire")
    assert await state.get(task_id) == {}


@BOTH
async def test_list_yields_task_ids_only(state, manager):
    task_ids = [new_id() for _ in range(3)]
    for task_id in task_ids:
        await state.update(task_id, {"status": TaskStatus.SCHEDULED})
        await state.acquire(task_id, 60)
        await state.cancel(task_id)
    # bookkeeping without any state must not show up either
    await state.acquire(new_id(), 60)
    await state.cancel(new_id())
    assert sorted([task_id async for task_id in state.list()]) == sorted(task_ids)


@BOTH
async def test_list_filters_by_prefix(state, manager):
    mine = [new_id("c1") for _ in range(2)]
    others = [new_id("c1b"), new_id("c2"), str(uuid.uuid4())]
    for task_id in mine + others:
        await state.update(task_id, {"status": TaskStatus.SCHEDULED})
    assert sorted([t async for t in state.list("task:db-c1-")]) == sorted(mine)
    assert [t async for t in state.list("task:db-nothing-")] == []


# -- locks ----------------------------------------------------------------------------


@BOTH
async def test_acquire_is_exclusive(state, manager):
    task_id = new_id()
    assert await state.acquire(task_id, 60) is True
    assert await state.is_locked(task_id) and await state.is_mine(task_id)
    with pytest.raises(TaskAlreadyAcquired):
        await state.acquire(task_id, 60)
    with as_worker(state, OTHER_WORKER):
        assert await state.is_locked(task_id)
        assert not await state.is_mine(task_id)
        with pytest.raises(TaskAlreadyAcquired):
            await state.acquire(task_id, 60)


@BOTH
async def test_release_by_owner(state, manager):
    task_id = new_id()
    await state.acquire(task_id, 60)
    assert await state.release(task_id) is True
    assert not await state.is_locked(task_id)
    assert await state.release(task_id) is False
    assert await state.acquire(task_id, 60) is True


@BOTH
async def test_another_workers_lock_cannot_be_released_or_refreshed(state, manager):
    task_id = new_id()
    with as_worker(state, OTHER_WORKER):
        await state.acquire(task_id, 60)
    with pytest.raises(TaskAccessUnauthorized):
        await state.release(task_id)
    with pytest.raises(TaskAccessUnauthorized):
        await state.refresh_lock(task_id, 60)
    with as_worker(state, OTHER_WORKER):
        assert await state.is_mine(task_id)


@BOTH
async def test_lock_expires_after_its_ttl(state, manager):
    task_id = new_id()
    await state.acquire(task_id, 1)
    await wait_for(lambda: _not(state.is_locked(task_id)), timeout=15, what="the lock to expire")
    with as_worker(state, OTHER_WORKER):
        assert await state.acquire(task_id, 60) is True


@BOTH
async def test_refresh_lock_extends_it(state, manager):
    refreshed, reference = new_id(), new_id()
    await state.acquire(refreshed, 1)
    await state.acquire(reference, 1)
    assert await state.refresh_lock(refreshed, 60) is True
    # the reference lock was taken after the refreshed one, with the same TTL
    await wait_for(lambda: _not(state.is_locked(reference)), timeout=15, what="the reference lock to expire")
    assert await state.is_mine(refreshed)


# -- cancellation -------------------------------------------------------------------


@BOTH
async def test_cancel_bookkeeping(state, manager):
    task_id, other = new_id(), new_id()
    assert not await state.is_canceled(task_id)
    assert await state.cancel(task_id) is True
    assert await state.cancel(other) is True
    assert await state.is_canceled(task_id)
    assert {t async for t in state.cancelation_list()} == {task_id, other}
    assert await state.clean_canceled(task_id) is True
    assert await state.clean_canceled(task_id) is False
    assert not await state.is_canceled(task_id)
    assert [t async for t in state.cancelation_list()] == [other]


@BOTH
async def test_canceled_among(state, manager):
    first, second, untouched = new_id(), new_id(), new_id()
    await state.cancel(first)
    await state.cancel(second)
    assert await state.canceled_among([first, untouched, second]) == {first, second}
    assert await state.canceled_among([untouched]) == set()
    assert await state.canceled_among([]) == set()


# -- the worker's hot path ---------------------------------------------------------


@BOTH
async def test_create_only_when_new(state, manager):
    task_id = new_id()
    assert await state.create(task_id, {"status": TaskStatus.SCHEDULED, "eventlog": []}) is True
    await state.update(task_id, {"job_retries": 2})
    assert await state.create(task_id, {"status": TaskStatus.SCHEDULED, "job_retries": 0}) is False
    assert await state.get(task_id) == {"status": TaskStatus.SCHEDULED, "eventlog": [], "job_retries": 2}


@BOTH
async def test_claim_new_task(state, manager):
    task_id = new_id()
    claim = await state.claim(task_id, JOB, lock_ttl=60)
    assert (claim.outcome, claim.job_retries) == (CLAIMED, 0)
    found = await state.get(task_id)
    assert found["status"] == TaskStatus.RUNNING
    assert found["job_data"] == JOB
    assert found["eventlog"] == [] and found["job_retries"] == 0
    assert await state.is_mine(task_id)


@BOTH
async def test_claim_of_a_redelivery_keeps_retries_and_eventlog(state, manager):
    task_id = new_id()
    eventlog = [["2024-01-01T00:00:00", "first run failed"]]
    await state.update(
        task_id, {"status": TaskStatus.ERRORED, "job_retries": 2, "eventlog": eventlog, "error": "Traceback"}
    )
    claim = await state.claim(task_id, JOB, lock_ttl=60)
    assert (claim.outcome, claim.job_retries) == (CLAIMED, 2)
    found = await state.get(task_id)
    assert found["status"] == TaskStatus.RUNNING
    assert (found["job_retries"], found["eventlog"], found["job_data"]) == (2, eventlog, JOB)


@BOTH
async def test_a_claim_that_finds_a_run_nobody_holds_counts_a_crash(state, manager):
    task_id = new_id()
    assert (await state.claim(task_id, JOB, lock_ttl=60)).crashes == 0
    await state.release(task_id)  # its worker died: the lock went, the state still says running
    claim = await state.claim(task_id, JOB, lock_ttl=60)
    assert (claim.outcome, claim.crashes, claim.job_retries) == (CLAIMED, 1, 0)
    await state.release(task_id)
    assert (await state.claim(task_id, JOB, lock_ttl=60)).crashes == 2
    assert (await state.get(task_id))["crashes"] == 2
    # a run that ended and was delivered again is no crash
    await state.finish(task_id, {"status": TaskStatus.FINISHED}, None, run=JOB.get("run"))
    claim = await state.claim(task_id, JOB, lock_ttl=60)
    assert claim.outcome == DONE and (await state.get(task_id))["crashes"] == 2


@BOTH
async def test_claim_of_a_canceled_task(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.SCHEDULED})
    await state.cancel(task_id)
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == CANCELED
    assert (await state.get(task_id))["status"] == TaskStatus.CANCELED
    assert not await state.is_canceled(task_id)
    assert not await state.is_locked(task_id)
    # a later duplicate delivery finds it done
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == DONE


@BOTH
async def test_claim_of_a_finished_task(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.FINISHED, "result": 3})
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == DONE
    assert await state.get(task_id) == {"status": TaskStatus.FINISHED, "result": 3}
    assert not await state.is_locked(task_id)


@BOTH
async def test_claim_of_a_finished_task_canceled_too_late(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.FINISHED, "result": 3})
    await state.cancel(task_id)
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == DONE
    assert await state.get(task_id) == {"status": TaskStatus.FINISHED, "result": 3}
    assert not await state.is_canceled(task_id)


@BOTH
async def test_claim_of_a_task_locked_by_another_worker(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.RUNNING, "job_retries": 1})
    with as_worker(state, OTHER_WORKER):
        await state.acquire(task_id, 60)
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == LOCKED
    assert await state.get(task_id) == {"status": TaskStatus.RUNNING, "job_retries": 1}
    with as_worker(state, OTHER_WORKER):
        assert await state.is_mine(task_id)


@BOTH
async def test_claim_of_a_locked_task_leaves_its_cancel_to_the_lock_holder(state, manager):
    # a redelivered copy must not swallow the cancel the running worker is about to act on
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.RUNNING})
    with as_worker(state, OTHER_WORKER):
        await state.acquire(task_id, 60)
    await state.cancel(task_id)
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == LOCKED
    assert await state.canceled_among([task_id]) == {task_id}
    assert (await state.get(task_id))["status"] == TaskStatus.RUNNING


@BOTH
async def test_finish_merges_releases_and_expires(state, manager):
    task_id = new_id()
    await state.update(task_id, {"job_retries": 1})
    await state.claim(task_id, JOB, lock_ttl=60)
    await state.finish(task_id, {"status": TaskStatus.FINISHED, "result": 0}, ttl=1)
    found = await state.get(task_id)
    assert (found["status"], found["result"], found["job_retries"]) == (TaskStatus.FINISHED, 0, 1)
    assert not await state.is_locked(task_id)
    await wait_for(lambda: _not(state.exists(task_id)), timeout=15, what="the finished state to expire")


@BOTH
async def test_finish_without_ttl_keeps_the_expiry(state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.RUNNING}, ttl=1)
    await state.finish(task_id, {"status": TaskStatus.FINISHED, "result": 1}, ttl=None)
    assert (await state.get(task_id))["result"] == 1
    await wait_for(lambda: _not(state.exists(task_id)), timeout=15, what="the state to expire")


@BOTH
async def test_finish_leaves_another_workers_lock(state, manager):
    task_id = new_id()
    with as_worker(state, OTHER_WORKER):
        await state.acquire(task_id, 60)
    await state.finish(task_id, {"status": TaskStatus.ERRORED, "error": "Traceback"}, ttl=60)
    assert (await state.get(task_id))["status"] == TaskStatus.ERRORED
    with as_worker(state, OTHER_WORKER):
        assert await state.is_mine(task_id)


@BOTH
async def test_refresh_locks_only_refreshes_ours(state, manager):
    ours, theirs, reference = new_id(), new_id(), new_id()
    await state.acquire(ours, 1)
    with as_worker(state, OTHER_WORKER):
        await state.acquire(theirs, 1)
    await state.acquire(reference, 1)
    await state.refresh_locks([ours, theirs, new_id()], ttl=60)
    await wait_for(lambda: _not(state.is_locked(reference)), timeout=15, what="the reference lock to expire")
    assert await state.is_mine(ours)
    assert not await state.is_locked(theirs)


@BOTH
@pytest.mark.parametrize("change", ["update", "claim", "finish"])
async def test_watch_wakes_on_a_status_change(state, manager, change):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.SCHEDULED})
    async with state.watch(task_id) as watch:
        waiter = asyncio.create_task(watch.wait(timeout=30))
        if change == "update":
            await state.update(task_id, {"status": TaskStatus.RUNNING})
        elif change == "claim":
            await state.claim(task_id, JOB, lock_ttl=60)
        else:
            await state.finish(task_id, {"status": TaskStatus.FINISHED}, ttl=60)
        # the wait's own timeout is 30 s: returning sooner means the change woke it
        await asyncio.wait_for(waiter, 10)


@BOTH
async def test_join_returns_when_another_coroutine_finishes_the_task(state, manager):
    task_id = new_id()
    await state.create(task_id, {"status": TaskStatus.SCHEDULED, "eventlog": []})
    joining = asyncio.create_task(TaskState(task_id).join(wait=30))
    await asyncio.sleep(0.2)
    assert not joining.done()
    await state.claim(task_id, JOB, lock_ttl=60)
    await state.finish(task_id, {"status": TaskStatus.FINISHED, "result": []}, ttl=60)
    # join re-reads on its own only every 30 s: returning sooner means the change woke it
    found = await asyncio.wait_for(joining, 10)
    assert (found["status"], found["result"]) == (TaskStatus.FINISHED, [])


async def _not(value: Any) -> bool:
    return not await value


# -- Redis only: transient errors and round trips ----------------------------------------


REDIS_ONLY = pytest.mark.parametrize("manager", ["redis"])


@REDIS_ONLY
@OWN_REDIS
async def test_redis_manager_survives_killed_connections(own_redis, state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.SCHEDULED})
    admin = own_redis.client()
    try:
        steps = [
            lambda: state.get(task_id),
            lambda: state.update(task_id, {"job_retries": 1}),
            lambda: state.cancel(task_id),
            lambda: state.claim(task_id, JOB, lock_ttl=60),
        ]
        for step in steps:
            killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            assert killed >= 1
            await step()
        assert await state.get(task_id) == {"status": TaskStatus.CANCELED, "job_retries": 1}
    finally:
        await admin.aclose()


@REDIS_ONLY
@OWN_REDIS
async def test_redis_manager_waits_out_an_outage(own_redis, state, manager):
    task_id = new_id()
    await state.update(task_id, {"status": TaskStatus.SCHEDULED})
    own_redis.stop()
    updating = asyncio.create_task(state.update(task_id, {"status": TaskStatus.RUNNING}))
    canceling = asyncio.create_task(state.cancel(task_id))
    await asyncio.sleep(0.2)
    assert not updating.done() and not canceling.done(), "gave up instead of retrying"
    own_redis.start()
    await asyncio.wait_for(asyncio.gather(updating, canceling), 40)
    # the restarted server kept nothing: what is there was written after the outage
    assert await state.get(task_id) == {"status": TaskStatus.RUNNING}
    assert await state.is_canceled(task_id)


async def _round_trips(server: OwnRedis, action: Any) -> int:
    """Client commands (a MULTI..EXEC block counts once) that `action()` sends to `server`."""
    marker = f"end-{uuid.uuid4()}"
    monitor_client, admin = server.client(), server.client()
    seen: list[str] = []
    await admin.ping()  # connect now, so its handshake is not counted
    try:
        async with monitor_client.monitor() as monitor:

            async def collect() -> None:
                in_transaction = False
                while True:
                    info = await monitor.next_command()
                    command = info["command"]
                    if marker in command:
                        return
                    if info["client_type"] == "lua":
                        continue
                    name = command.split(" ", 1)[0].upper()
                    if name == "MULTI":
                        in_transaction = True
                    elif name == "EXEC":
                        in_transaction = False
                    if not in_transaction:
                        seen.append(command)

            collecting = asyncio.create_task(collect())
            await action()
            await admin.echo(marker)
            await asyncio.wait_for(collecting, 10)
    finally:
        await monitor_client.aclose()
        await admin.aclose()
    return len(seen)


@REDIS_ONLY
@OWN_REDIS
async def test_one_round_trip_per_transition(own_redis, state, manager):
    warm = new_id()  # the first use of each script loads it into Redis
    await state.create(warm, {"status": TaskStatus.SCHEDULED})
    await state.claim(warm, JOB, lock_ttl=60)
    await state.refresh_locks([warm], 60)
    await state.finish(warm, {"status": TaskStatus.FINISHED}, ttl=60)
    await state.update(warm, {"result": 1})
    await state.append_event(warm, ["t", "x"], 10)
    await state.get(warm)
    task_id = new_id()
    counts = {
        "create": await _round_trips(own_redis, lambda: state.create(task_id, {"status": "scheduled"})),
        "claim": await _round_trips(own_redis, lambda: state.claim(task_id, JOB, lock_ttl=60)),
        "refresh_locks": await _round_trips(own_redis, lambda: state.refresh_locks([task_id], 60)),
        "canceled_among": await _round_trips(own_redis, lambda: state.canceled_among([task_id])),
        "finish": await _round_trips(own_redis, lambda: state.finish(task_id, {"status": "finished"}, 60)),
        "update": await _round_trips(own_redis, lambda: state.update(task_id, {"result": 1})),
        "append_event": await _round_trips(own_redis, lambda: state.append_event(task_id, ["t", "x"], 10)),
        "get": await _round_trips(own_redis, lambda: state.get(task_id)),
        "cancel": await _round_trips(own_redis, lambda: state.cancel(task_id)),
    }
    print("redis round trips per call:", counts)
    # create, claim and finish index a container's task inside their own script: one command
    assert counts == dict.fromkeys(counts, 1)


class _UnconfirmedPubSub:
    """A pubsub whose PSUBSCRIBE Redis has not run yet, until `confirm` is set."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()
        self.confirm = asyncio.Event()

    async def __aenter__(self) -> "_UnconfirmedPubSub":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    async def psubscribe(self, pattern: str) -> None:
        self.sent.set()

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float = 0) -> Any:
        if ignore_subscribe_messages:  # dispatching: nothing is published in this test
            await asyncio.sleep(timeout)
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.confirm.wait(), timeout)
            return {"type": "psubscribe", "pattern": None, "channel": b"x*", "data": 1}
        return None


async def test_the_state_listener_is_ready_only_once_redis_confirmed_its_subscription():
    # ready before the confirmation, a change published meanwhile on another connection
    # (which Redis may run first) would wake no watcher: join() would wait out its timeout
    pubsub = _UnconfirmedPubSub()
    notifier = _Notifier(SimpleNamespace(pubsub=lambda: pubsub), "x*")
    try:
        await asyncio.wait_for(pubsub.sent.wait(), 10)
        await asyncio.sleep(0.2)
        assert not notifier.ready.is_set()
        pubsub.confirm.set()
        await asyncio.wait_for(notifier.ready.wait(), 10)
    finally:
        await notifier.close()
