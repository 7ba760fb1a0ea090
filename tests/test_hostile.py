"""What a hostile or broken message can do to a worker: nothing but land in the error queue.

Each test publishes the exact hostile input through RabbitMQ and then checks what a user
sees: the worker keeps consuming, valid tasks finish, the hostile message is in the error
queue with a logged reason, and no state outside its own id is touched.
"""

import json
import logging
import uuid

import orjson
import pytest

from guillotina_amqp import add_task, cancel_task, liveness, names
from guillotina_amqp import message as messages
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from tests import app
from tests.test_security import publish, task_message
from tests.utils import (
    BOTH_MANAGERS,
    all_empty,
    error_queue_count,
    lines,
    logged,
    publish_raw,
    queue_counts,
    redis_client,
    take_dead_letter,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("outside_container", "info_logs")
KEY = "hostile-test-signing-key"


async def refused(count: int, caplog, *words: str) -> None:
    """Wait for `count` messages in the error queue, each logged as refused with `words`."""
    await wait_for(lambda: _errors_are(count), timeout=60, what=f"{count} message(s) in the error queue")
    assert logged(caplog, "refused", "error queue", *words) == count, caplog.text


async def _errors_are(count: int) -> bool:
    return await error_queue_count() == count


async def still_serving() -> None:
    final = await (await add_task(app.add, 20, 22)).join()
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, 42)


def signed(body: bytes) -> dict:
    return {messages.SIGNATURE_HEADER: messages.signature(body, KEY)}


# -- 1. headers are checked before use -----------------------------------------------------


@pytest.mark.app_settings({"amqp": {"signing_key": KEY, "max_running_tasks": 2}})
@pytest.mark.parametrize(
    "given",
    ["é" * 64, "z" * 64, "0" * 63, 12345, ["a"] * 64],
    ids=["non-ascii", "not-hex", "short", "int", "list"],
)
async def test_a_malformed_signature_header_is_refused_and_never_stalls_the_worker(worker, caplog, given):
    body = orjson.dumps(task_message("tests.app.add", 1, 2))
    # more hostile messages than the worker's prefetch: unsettled ones would stall it
    for _ in range(3):
        await publish_raw(body, {messages.SIGNATURE_HEADER: given})
    await refused(3, caplog, "signature header")
    await still_serving()


# -- 2. task ids cannot reach bookkeeping keys ---------------------------------------------


async def key_type(name: str) -> str:
    client = await redis_client()
    try:
        return (await client.type(get_settings().redis_prefix_key + name)).decode()
    finally:
        await client.aclose()


async def test_a_task_id_naming_the_cancel_set_is_refused_and_cancels_keep_working(worker, caplog, tmp_path):
    await publish_raw(orjson.dumps({**task_message("tests.app.add", 1, 2), "task_id": "cancel"}))
    await refused(1, caplog, "reserved")

    marker = tmp_path / "runs"
    victim = await add_task(app.sleep_then_mark, str(marker), 30)
    await wait_for(lambda: lines(marker) == ["started"], what="the task to start")
    assert await cancel_task(victim.task_id) is True
    assert (await victim.join())["status"] == TaskStatus.CANCELED
    assert await key_type("cancel") in ("zset", "none")


async def test_a_task_id_naming_another_tasks_lock_is_refused_and_leaves_it_alone(worker, caplog, tmp_path):
    marker = tmp_path / "runs"
    victim = await add_task(app.sleep_then_mark, str(marker), 1)
    await wait_for(lambda: lines(marker) == ["started"], what="the victim to start")
    for prefix in ("lock:", "eventlog:", "meta:"):
        await publish_raw(
            orjson.dumps({**task_message("tests.app.add", 1, 2), "task_id": prefix + victim.task_id})
        )
    await refused(3, caplog, "reserved")

    final = await victim.join()
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, "done")
    assert lines(marker) == ["started", "done"]


@pytest.mark.parametrize("task_id", ["cancel", "lock:x", "eventlog:x", "a\nb", "é", "x" * 201, ""])
async def test_add_task_refuses_a_task_id_outside_the_alphabet_and_publishes_nothing(worker, task_id):
    with pytest.raises(ValueError):
        await add_task(app.add, 1, 2, _task_id=task_id)
    assert await all_empty()


# -- 3. what cannot be encoded again ---------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_json_nested_deeper_than_it_can_be_stored_goes_to_the_error_queue_once(worker, caplog):
    task_id = f"deep-{uuid.uuid4()}"
    body = b'{"func":"tests.app.add","task_id":"%s","args":[%s,1]}' % (task_id.encode(), nested(300))
    await publish_raw(body)
    await refused(1, caplog, task_id, "cannot be stored")
    await still_serving()
    assert (await queue_counts())[names.delay_queue(get_settings().queue)] == 0
    assert "cannot be stored" in (await TaskState(task_id).get_state())["error"]


async def test_add_task_refuses_arguments_nested_too_deeply(worker):
    with pytest.raises(ValueError, match="JSON"):
        await add_task(app.add, json.loads(nested(300)), 1)
    assert await all_empty()


# -- 4. probes never touch a task's state ------------------------------------------------------


@pytest.mark.app_settings({"amqp": {"signing_key": KEY}})
async def test_a_signed_message_replayed_as_a_probe_does_not_spoil_a_finished_task(worker, caplog):
    message = task_message("tests.app.add", 2, 3)
    body = orjson.dumps(message)
    task_id = await publish(message, body, signed(body))  # recorded scheduled first, as add_task does
    final = await TaskState(task_id).join()
    assert final["result"] == 5

    await publish_raw(body, {**signed(body), liveness.PROBE_HEADER: "1"})
    await refused(1, caplog, "malformed no-op probe")
    assert await TaskState(task_id).get_state() == final


# -- 5. the promises of docs/security.md -------------------------------------------------------


async def test_credentials_in_the_query_string_are_never_published(container_requester, worker):
    async with container_requester as requester:
        response, status = await requester(
            "POST",
            "/db/guillotina/@test-schedule",
            params={"ws_token": "secret-ws", "access_token": "secret-oauth", "page": "2"},
            data=json.dumps({"kind": "add"}),
        )
        assert status == 200, response
        final = await TaskState(response["task_id"]).join()

    seen = json.dumps(final)
    assert "secret-ws" not in seen and "secret-oauth" not in seen
    assert "page=2" in final["job_data"]["req_data"]["url"] and "page=2" in final["result"]["url"]


async def test_credentials_an_older_publisher_put_in_the_url_are_not_stored(worker):
    message = task_message("tests.app.add", 1, 2)
    message["req_data"]["url"] = "http://localhost/db/c?ws_token=secret-ws&page=2"
    final = await TaskState(await publish(message)).join()
    assert final["job_data"]["req_data"]["url"] == "http://localhost/db/c?page=2"


@pytest.mark.app_settings({"amqp": {"max_message_bytes": 2000}})
async def test_a_message_larger_than_max_message_bytes_is_refused_at_add_task_and_by_the_worker(
    worker, caplog
):
    with pytest.raises(ValueError, match="max_message_bytes"):
        await add_task(app.add, "x" * 3000, "y")
    assert await all_empty()

    message = task_message("tests.app.add", "x" * 3000, "y")
    await publish_raw(orjson.dumps(message))
    await refused(1, caplog, message["task_id"], "max_message_bytes")
    state = await TaskState(message["task_id"]).get_state()
    assert "x" * 100 not in json.dumps(state)  # the body is not stored


async def test_unknown_top_level_fields_are_refused(worker, caplog):
    message = {**task_message("tests.app.add", 1, 2), "payload": "x" * 1000}
    await publish_raw(orjson.dumps(message))
    await refused(1, caplog, message["task_id"], "unknown fields payload")
    assert "x" * 100 not in json.dumps(await TaskState(message["task_id"]).get_state())


@BOTH_MANAGERS
@pytest.mark.app_settings({"amqp": {"max_eventlog": 3}})
async def test_the_event_log_keeps_the_last_max_eventlog_entries(worker, manager):
    final = await (await add_task(app.progress, 10)).join()
    assert [text for _, text in final["eventlog"]] == ["step 7", "step 8", "step 9"]
    assert final["result"] == list(range(10))


@pytest.mark.parametrize(
    "func",
    [
        "guillotina_amqp.utils.add_task",
        "guillotina_amqp.metrics.start_server",
        "guillotina_amqp.commands.worker.WorkerCommand",
    ],
)
async def test_internals_of_guillotina_amqp_are_not_tasks(worker, caplog, func):
    await publish_raw(orjson.dumps(task_message(func, 1)))
    await refused(1, caplog, func)
    await still_serving()


async def test_a_replay_naming_another_function_never_changes_an_ended_run(worker, caplog):
    """A replay of an ended run is skipped whatever function it names (a run that will not run
    is never refused for its function), and the ended run's state stays as it was."""
    final = await (await add_task(app.add, 1, 1)).join()
    task_id = final["job_data"]["task_id"]
    replay = {**final["job_data"], "func": "tests.app.no_such_function"}
    with caplog.at_level(logging.INFO, logger="guillotina_amqp"):
        await publish_raw(orjson.dumps(replay))
        await wait_for(lambda: logged(caplog, task_id, "skipping it") == 1, what="the replay to be skipped")
    await still_serving()
    assert await error_queue_count() == 0
    assert await get_state_manager().get(task_id) == final


# -- RabbitMQ's own dead-lettering never reads a forged death record -------------------------

FORGED_DEATH = {"x-death": [False, {"count": "many"}], "x-first-death-queue": 7}


@pytest.mark.parametrize(
    "func, args",
    [("tests.app.no_such_function", []), ("tests.app.fail", ["boom"])],
    ids=["refused", "retried"],
)
@pytest.mark.app_settings({"amqp": {"max_task_retries": 1}})
async def test_a_forged_death_header_crashes_no_queue(worker, caplog, func, args):
    """RabbitMQ 3.10 crashes a queue that dead-letters a message whose x-death is malformed."""
    message = task_message(func, *args)
    await publish_raw(orjson.dumps(message), FORGED_DEATH)
    await wait_for(lambda: _errors_are(1), timeout=60, what="the message in the error queue")
    for _ in range(3):  # the main and delay queues still carry tasks
        await still_serving()
    dead = await take_dead_letter()
    assert not any(name.startswith(("x-death", "x-first-death")) for name in dead["properties"].headers or {})
