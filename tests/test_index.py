"""The per-container task index and worker presence, the same on both state managers (docs/design.md)."""

import asyncio
import uuid

import pytest

from guillotina_amqp import task_index
from guillotina_amqp.state import TaskStatus
from tests import test_state
from tests.test_state import BOTH, JOB, new_id
from tests.utils import wait_for

state = test_state.state  # the fixture: the configured manager, checked to be the one asked for

C1, C2 = "task:db-c1-", "task:db-c2-"


async def schedule(state, container: str = "c1") -> str:
    task_id = new_id(container)
    assert await state.create(task_id, {"status": TaskStatus.SCHEDULED, "eventlog": [], "job_data": JOB})
    return task_id


async def ids(state, container: str, status: str | None = None, limit: int = 50) -> list[str]:
    page = await task_index.page(state, container, limit, None, status)
    return [task["task_id"] for task in page.tasks]


@BOTH
async def test_a_container_lists_its_own_tasks_newest_first(state, manager):
    mine = [await schedule(state) for _ in range(3)]
    theirs = await schedule(state, "c2")
    await state.create(str(uuid.uuid4()), {"status": TaskStatus.SCHEDULED})  # outside any container
    assert await ids(state, C1) == mine[::-1]
    assert await ids(state, C2) == [theirs]
    assert await task_index.all_ids(state, C1) == mine[::-1]


@BOTH
async def test_the_index_follows_every_transition(state, manager):
    task_id = await schedule(state)
    assert await ids(state, C1, "scheduled") == [task_id]
    claim = await state.claim(task_id, JOB, lock_ttl=60)
    assert claim.outcome == "claimed"
    assert await ids(state, C1, "running") == [task_id]
    assert await ids(state, C1, "scheduled") == []
    await state.finish(task_id, {"status": TaskStatus.ERRORED, "error": "Traceback\nValueError: boom"}, 60)
    assert await ids(state, C1, "errored") == [task_id]
    assert await ids(state, C1, "running") == []
    [task] = (await task_index.page(state, C1, 10, None, "errored")).tasks
    assert task["function"] == "tests.app.add"
    assert task["error"] == "ValueError: boom"
    assert task["duration"] is not None and task["age"] is not None
    await state.update(task_id, {"status": TaskStatus.SCHEDULED})  # a retry starts over
    assert await ids(state, C1, "scheduled") == [task_id]
    assert await ids(state, C1) == [task_id]  # listed once, at its creation time


@BOTH
async def test_a_task_canceled_before_it_ran_is_indexed_canceled(state, manager):
    task_id = await schedule(state)
    await state.cancel(task_id)
    assert (await state.claim(task_id, JOB, lock_ttl=60)).outcome == "canceled"
    assert await ids(state, C1, "canceled") == [task_id]


@BOTH
async def test_pages_follow_each_other_without_gaps_or_repeats(state, manager):
    created = [await schedule(state) for _ in range(7)]
    seen, cursor = [], None
    for _ in range(4):
        page = await task_index.page(state, C1, 3, cursor)
        seen += [task["task_id"] for task in page.tasks]
        cursor = page.cursor
        if cursor is None:
            break
        await schedule(state)  # new tasks arriving meanwhile do not shift the pages
    assert seen == created[::-1]


@BOTH
async def test_entries_whose_state_expired_are_skipped_and_dropped(state, manager):
    gone = await schedule(state)
    kept = await schedule(state)
    await state.update(gone, {"status": TaskStatus.FINISHED}, ttl=1)
    await wait_for(lambda: _expired(state, gone), what="the state's TTL to run out")
    assert await task_index.all_ids(state, C1) == [kept]  # the unpaged listing too
    assert await ids(state, C1) == [kept]
    assert [task_id for _, task_id in await state.index_page(C1, None, None, 10)] == [kept]


@BOTH
async def test_bad_page_arguments_are_refused_by_name(state, manager):
    with pytest.raises(ValueError, match="invalid cursor"):
        await task_index.page(state, C1, 10, "not-a-cursor")
    with pytest.raises(ValueError, match="invalid limit"):
        task_index.check_query("0", None)
    with pytest.raises(ValueError, match="invalid status"):
        task_index.check_query("10", "done")


@BOTH
async def test_the_chart_counts_tasks_that_ended_in_the_last_hour(state, manager):
    for outcome in (TaskStatus.FINISHED, TaskStatus.FINISHED, TaskStatus.ERRORED):
        await state.finish(await schedule(state), {"status": outcome}, 60)
    chart = await task_index.throughput(state, C1)
    assert sum(chart["finished"]) == 2 and sum(chart["errored"]) == 1 and sum(chart["canceled"]) == 0
    assert chart["finished"][-1] == 2  # the current bucket


@BOTH
async def test_workers_announce_and_expire(state, manager):
    await state.announce("w1", {"worker_id": "w1", "running": []}, ttl=60)
    await state.announce("w2", {"worker_id": "w2", "running": []}, ttl=0.3)
    assert sorted(w["worker_id"] for w in await state.workers()) == ["w1", "w2"]
    await wait_for(lambda: _retired(state, "w2"), what="w2's announcement to expire")
    assert [w["worker_id"] for w in await state.workers()] == ["w1"]
    await state.retire("w1")
    assert await state.workers() == []


@BOTH
async def test_listeners_hear_of_their_containers_changes_only(state, manager):
    async with state.changes(C1) as changes:
        await schedule(state, "c2")  # another container: not heard
        task_id = await schedule(state)
        assert await asyncio.wait_for(changes.__anext__(), 10) == task_id
        await state.update(task_id, {"eventlog": [["t", "step 1"]]})  # progress is heard too
        assert await asyncio.wait_for(changes.__anext__(), 10) == task_id


@BOTH
async def test_a_function_filter_reads_a_bounded_stretch_per_page(state, manager, monkeypatch):
    monkeypatch.setattr(task_index, "MAX_EXAMINED", 4)
    monkeypatch.setattr(task_index, "READ_AHEAD", 2)
    wanted = await schedule(state)
    others = [await schedule(state) for _ in range(5)]
    await state.update(wanted, {"job_data": {**JOB, "func": "tests.app.rare"}})

    first = await task_index.page(state, C1, 10, None, None, None, "rare")
    assert first.tasks == [] and first.cursor  # 4 entries read, nothing found yet: go on
    second = await task_index.page(state, C1, 10, first.cursor, None, None, "rare")
    assert [task["task_id"] for task in second.tasks] == [wanted] and second.cursor is None
    assert len(await ids(state, C1)) == len(others) + 1


async def _expired(state, task_id: str) -> bool:
    return not await state.exists(task_id)


async def _retired(state, worker_id: str) -> bool:
    return worker_id not in [w["worker_id"] for w in await state.workers()]
