"""Moving from the original plugin without losing a run (docs/migrating.md).

Given what an application of the original does (reuse a task id, leave JSON-string
state in Redis, return results JSON cannot hold, delete a container), when our
worker takes over, then every run happens once, and nothing loops for ever.
"""

import orjson
import pytest

from guillotina_amqp import add_task, names
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from tests import app
from tests.test_security import publish, task_message
from tests.utils import (
    BOTH_MANAGERS,
    REDIS_ONLY,
    all_empty,
    error_queue_count,
    lines,
    logged,
    publish_raw,
    queue_counts,
    redis_client,
    running_worker,
    take_dead_letter,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("outside_container", "info_logs")


# -- runs -----------------------------------------------------------------------------


@BOTH_MANAGERS
async def test_a_reused_task_id_runs_again_once_its_run_ended(worker, manager, tmp_path):
    marker = tmp_path / "runs"
    first = await (await add_task(app.write_marker, str(marker), "monday", _task_id="nightly")).join()
    second = await (await add_task(app.write_marker, str(marker), "tuesday", _task_id="nightly")).join()

    assert lines(marker) == ["monday", "tuesday"]
    assert (second["status"], second["result"]) == (TaskStatus.FINISHED, "tuesday")
    assert first["run"] < second["run"]
    assert second["job_retries"] == 0


@BOTH_MANAGERS
async def test_a_redelivered_copy_of_an_ended_run_never_runs_again(worker, manager, tmp_path, caplog):
    marker = tmp_path / "runs"
    first = await (await add_task(app.write_marker, str(marker), "first", _task_id="reused")).join()
    second = await (await add_task(app.write_marker, str(marker), "second", _task_id="reused")).join()

    # the broker delivers both runs' messages again: the ended run, and the run before it
    await publish_raw(orjson.dumps(second["job_data"]))
    await publish_raw(orjson.dumps(first["job_data"]))
    await wait_for(lambda: logged(caplog, "reused", "skipping") == 2, what="both copies to be skipped")
    await wait_for(all_empty, what="both copies to be acked")

    assert lines(marker) == ["first", "second"]
    assert await TaskState("reused").get_state() == second


@BOTH_MANAGERS
async def test_the_earlier_run_still_running_holds_off_the_later_one(worker, manager, tmp_path):
    marker = tmp_path / "runs"
    first = await add_task(app.sleep_then_mark, str(marker), 1, _task_id="overlap")
    await wait_for(lambda: lines(marker) == ["started"], what="the first run to start")
    await add_task(app.write_marker, str(marker), "second run", _task_id="overlap")

    final = await wait_for(_finished_with("second run"), timeout=60, what="the second run to finish")
    # never both at once: the second started only after the first was done
    assert lines(marker) == ["started", "done", "second run"]
    assert final["job_retries"] == 0 and first.task_id == "overlap"


def _finished_with(result):
    async def check():
        state = await get_state_manager().get("overlap")
        return state if state.get("result") == result else None

    return check


# -- the original's JSON-string state -------------------------------------------------

LEGACY_EVENTLOG = [["2024-05-01T10:00:00+00:00", "queued by the original"]]


async def seed_legacy(task_id: str, state: dict, ttl: int | None = None) -> None:
    """What the original plugin's update() leaves: SET <prefix><task_id> '<json>'."""
    client = await redis_client()
    try:
        await client.set(
            names.state_key(get_settings().redis_prefix_key, task_id), orjson.dumps(state), ex=ttl
        )
    finally:
        await client.aclose()


async def key_type(task_id: str) -> str:
    client = await redis_client()
    try:
        return (await client.type(names.state_key(get_settings().redis_prefix_key, task_id))).decode()
    finally:
        await client.aclose()


@REDIS_ONLY
async def test_legacy_state_is_read_by_every_reader(container_requester, manager):
    async with container_requester as requester:
        task_id = names.task_id_prefix("db", "guillotina") + "3f1e0c1e-6a51-4a8d-a2a5-3c5a2e2f6d10"
        legacy = {"status": "finished", "result": 42, "eventlog": LEGACY_EVENTLOG, "job_retries": 1}
        await seed_legacy(task_id, legacy)

        assert await TaskState(task_id).get_state() == legacy
        assert await TaskState(task_id).get_result() == 42
        assert (await TaskState(task_id).join())["result"] == 42
        found, status = await requester("GET", f"/db/guillotina/@amqp-tasks/{task_id}")
        assert (status, found) == (200, legacy)
        assert await key_type(task_id) == "string"  # reading never rewrites it
        # the listing reads the container index: the original's states are taken over into it
        listed, status = await requester("GET", "/db/guillotina/@amqp-tasks")
        assert (status, listed) == (200, [task_id])
        assert await key_type(task_id) == "hash"
        assert await TaskState(task_id).get_state() == legacy


@REDIS_ONLY
async def test_a_message_queued_by_the_original_runs_once_and_its_state_is_taken_over(
    guillotina_main, manager, tmp_path, caplog
):
    marker = tmp_path / "runs"
    message = task_message("tests.app.write_marker", str(marker), "ran")  # no "run": the original's
    await seed_legacy(message["task_id"], {"status": "scheduled", "eventlog": LEGACY_EVENTLOG}, ttl=3600)
    await publish_raw(orjson.dumps(message))

    async with running_worker():
        final = await TaskState(message["task_id"]).join()
        await wait_for(all_empty, what="the message to be acked")

    assert lines(marker) == ["ran"]
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, "ran")
    assert final["eventlog"] == LEGACY_EVENTLOG
    assert await key_type(message["task_id"]) == "hash"
    assert not logged(caplog, "rolling upgrade")


@REDIS_ONLY
async def test_an_original_worker_on_our_queue_is_reported_and_its_run_kept(
    worker, manager, tmp_path, caplog
):
    """Rolling upgrades with original workers consuming our messages are refused loudly: docs/migrating.md."""
    marker = tmp_path / "runs"
    state = await add_task(app.write_marker, str(marker), "ours")
    final = await state.join()
    # an original worker took a copy of our message, ran it and wrote its JSON string state
    await seed_legacy(state.task_id, {"status": "finished", "result": "ours", "job_data": final["job_data"]})
    await publish_raw(orjson.dumps(final["job_data"]))

    await wait_for(lambda: logged(caplog, state.task_id, "rolling upgrade"), what="the error line")
    await wait_for(all_empty, what="the copy to be acked")
    assert lines(marker) == ["ours"]  # the run the original worker did is not done again
    assert (await state.get_state())["run"] == final["run"]


@REDIS_ONLY
async def test_a_legacy_state_that_is_not_json_is_started_afresh(worker, manager, tmp_path):
    message = task_message("tests.app.add", 2, 3)
    client = await redis_client()
    try:
        await client.set(
            names.state_key(get_settings().redis_prefix_key, message["task_id"]), b"\xff not json"
        )
    finally:
        await client.aclose()
    await publish_raw(orjson.dumps(message))
    final = await TaskState(message["task_id"]).join()
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 5)


# -- failures of ours are bounded -----------------------------------------------------


@BOTH_MANAGERS
@pytest.mark.parametrize("kind", ["set", "bytes", "int-keys"])
@pytest.mark.app_settings({"amqp": {"max_task_retries": 1}})
async def test_a_result_json_cannot_hold_ends_errored_within_the_retry_budget(worker, manager, kind):
    state = await add_task(app.unstorable, kind)
    await wait_for(error_queue_count, timeout=60, what="the message in the error queue")
    final = await state.get_state()

    assert final["status"] == TaskStatus.ERRORED
    assert "cannot be stored as JSON" in final["error"] and "tests.app.unstorable" in final["error"]
    assert final["job_retries"] == 1
    assert worker.total_run == 2  # the first run and one retry, then never again
    assert (await queue_counts())[names.delay_queue(get_settings().queue)] == 0


@BOTH_MANAGERS
@pytest.mark.app_settings({"amqp": {"max_task_retries": 2, "lock_ttl": 1}})
async def test_a_state_write_refused_after_the_run_is_retried_within_the_budget(
    worker, manager, tmp_path, monkeypatch
):
    from redis.exceptions import ResponseError

    async def refused(*args, **kwargs):
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(type(worker.state_manager), "finish", refused)
    marker = tmp_path / "runs"
    await add_task(app.write_marker, str(marker))
    await wait_for(error_queue_count, timeout=90, what="the message in the error queue")

    assert lines(marker) == ["ran"] * 3  # the run and two retries: the budget, not for ever
    dead = await take_dead_letter()
    assert dead["properties"].headers["x-guillotina-amqp-failures"] == 2
    assert (await queue_counts())[names.delay_queue(get_settings().queue)] == 0


# -- live states never expire ---------------------------------------------------------


@REDIS_ONLY
@pytest.mark.app_settings({"amqp": {"state_ttl": 5}})
async def test_a_waiting_or_running_state_has_no_expiry_and_an_ended_one_has_state_ttl(
    guillotina_main, manager, tmp_path
):
    marker = tmp_path / "runs"
    state = await add_task(app.sleep_then_mark, str(marker), 0.5)
    client = await redis_client()
    key = names.state_key(get_settings().redis_prefix_key, state.task_id)
    try:
        assert await client.ttl(key) == -1  # queued, however long: no expiry
        async with running_worker():
            await wait_for(lambda: lines(marker) == ["started"], what="the task to run")
            assert await client.ttl(key) == -1
            await state.join()
        assert 0 < await client.ttl(key) <= 5
    finally:
        await client.aclose()


@BOTH_MANAGERS
@pytest.mark.app_settings({"amqp": {"state_ttl": 1}})
async def test_a_task_running_longer_than_state_ttl_keeps_its_state(worker, manager):
    state = await add_task(app.sleep_then_add, 2.5, 1, 2)
    final = await state.join()  # raised TaskNotFoundException when the state expired mid-run
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 3)


# -- deleted containers -----------------------------------------------------------------


@BOTH_MANAGERS
@pytest.mark.app_settings({"amqp": {"max_task_retries": 1}})
async def test_a_plain_task_whose_container_was_deleted_is_retried_then_errored(guillotina_main, manager):
    message = task_message("tests.app.add", 1, 2)
    message.update(db_id="db", container_id="deleted-container")
    task_id = await publish(message)
    async with running_worker() as worker:
        await wait_for(error_queue_count, timeout=60, what="the message in the error queue")
        final = await TaskState(task_id).get_state()
        assert worker.total_run == 2
    assert final["status"] == TaskStatus.ERRORED
    assert "ContainerNotFound: container deleted-container not found" in final["error"]


@BOTH_MANAGERS
async def test_an_object_task_whose_container_was_deleted_finishes_without_result(guillotina_main, manager):
    message = task_message("guillotina_amqp.utils._run_object_task", "tests.app.set_title", "/doc", "x")
    message.update(db_id="db", container_id="deleted-container")
    task_id = await publish(message)
    async with running_worker():
        final = await TaskState(task_id).join()
        await wait_for(all_empty, what="the message to be acked")
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, None)
