"""The names the original plugin's users import (docs/migrating.md), used as those users use them.

Each test imports from the original's module paths, not from where our code lives.
"""

import asyncio
import json
import time
import uuid

import aioamqp
import orjson
import pytest
from guillotina import app_settings, task_vars
from guillotina.auth.users import GuillotinaUser, RootUser
from guillotina.auth.utils import set_authenticated_user
from guillotina.tests.utils import get_mocked_request
from prometheus_client import CollectorRegistry, Histogram

from guillotina_amqp import add_task
from guillotina_amqp.amqp import get_connection, remove_connection
from guillotina_amqp.api import can_debug_amqp
from guillotina_amqp.interfaces import MessageType
from guillotina_amqp.job import Job, Outcome
from guillotina_amqp.liveness import EXIT_IDLE
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import (
    MemoryStateManager,
    RedisStateManager,
    TaskState,
    TaskStatus,
    get_state_manager,
    update_task_canceled,
    update_task_errored,
    update_task_finished,
    update_task_running,
    update_task_scheduled,
)
from guillotina_amqp.types import SerializedRequest
from guillotina_amqp.utils import (
    generate_task_id,
    get_task_id_prefix,
    make_request,
    metric_measure,
    serialize_request,
)
from guillotina_amqp.worker import Worker
from tests.test_context import enter_container
from tests.utils import running_worker, wait_for

BOTH_MANAGERS = pytest.mark.parametrize("manager", ["memory", "redis"])
MANAGER_CLASSES = {"memory": MemoryStateManager, "redis": RedisStateManager}


def message(task_id: str, func: str = "tests.app.add", args: list | None = None) -> dict:
    """A task message as add_task publishes it, outside any container."""
    return {
        "func": func,
        "args": [2, 3] if args is None else args,
        "kwargs": {},
        "db_id": None,
        "container_id": None,
        "task_id": task_id,
        "req_data": {},
    }


# -- guillotina_amqp.interfaces.MessageType ---------------------------------------------------


def test_message_type_values_are_plain_strings():
    assert MessageType.RESULT == "result" and MessageType.DEBUG == "debug"
    assert str(MessageType.RESULT) == "result" and str(MessageType.DEBUG) == "debug"
    assert f"{MessageType.RESULT}" == "result"
    assert json.dumps([MessageType.DEBUG]) == '["debug"]'
    assert MessageType("result") is MessageType.RESULT


# -- guillotina_amqp.state ---------------------------------------------------------------------


@BOTH_MANAGERS
async def test_get_state_manager_accepts_the_loop_argument(guillotina_main, manager):
    loop = asyncio.get_running_loop()
    found = get_state_manager(loop)
    assert found is get_state_manager(loop=loop) is get_state_manager()
    assert isinstance(found, MANAGER_CLASSES[manager])


@BOTH_MANAGERS
async def test_update_task_helpers_write_each_status(guillotina_main, manager):
    state_manager = get_state_manager()
    task_id = str(uuid.uuid4())
    state = TaskState(task_id)

    await update_task_scheduled(state_manager, task_id)
    assert (await state.get_state())["status"] == TaskStatus.SCHEDULED
    assert (await state.get_state())["eventlog"] == []
    await update_task_running(state_manager, task_id)
    assert await state.get_status() == TaskStatus.RUNNING
    await update_task_finished(state_manager, task_id, result=[1, "two"])
    assert await state.get_status() == TaskStatus.FINISHED
    assert await state.get_result() == [1, "two"]
    try:
        raise ValueError("the task broke")
    except ValueError:
        await update_task_errored(state_manager, task_id)
    errored = await state.get_state()
    assert errored["status"] == TaskStatus.ERRORED
    assert "ValueError: the task broke" in errored["error"]
    await update_task_errored(state_manager, task_id, error="given reason")
    assert (await state.get_state())["error"] == "given reason"
    await update_task_canceled(state_manager, task_id)
    assert await state.get_status() == TaskStatus.CANCELED


# -- guillotina_amqp.utils ---------------------------------------------------------------------


async def test_task_ids_outside_a_container(guillotina_main, outside_container):
    assert get_task_id_prefix() == ""
    generated = generate_task_id()
    assert str(uuid.UUID(generated)) == generated
    assert generate_task_id() != generated


async def test_task_ids_inside_a_container(container_requester):
    async with container_requester as requester:
        container = await enter_container(requester)
        prefix = get_task_id_prefix()
        assert prefix == f"task:{requester.db.id}-{container.id}-"
        assert generate_task_id().startswith(prefix)
        state = await add_task("tests.app.add", 1, 2)
        assert state.task_id.startswith(prefix)  # add_task names its tasks the same way


async def test_serialize_request_then_make_request(guillotina_main):
    request = get_mocked_request(headers={"Authorization": "Bearer secret", "X-Custom": "kept"})
    set_authenticated_user(GuillotinaUser(user_id="alice", roles={"guillotina.Member": 1}))

    req_data = serialize_request(request)

    assert set(req_data) == set(SerializedRequest.__annotations__)  # guillotina_amqp.types is honest
    assert req_data["user"]["id"] == "alice" and "guillotina.Member" in req_data["user"]["roles"]
    assert "authorization" not in {name.lower() for name in req_data["headers"]}
    assert serialize_request()["url"] == request.url  # the current request by default

    rebuilt = make_request(object(), req_data)

    assert rebuilt.url == request.url and rebuilt.method == request.method
    assert rebuilt.headers.get("X-Custom") == "kept"
    assert rebuilt.headers.get("Authorization") is None
    assert task_vars.request.get() is rebuilt


def test_metric_measure_observes_with_or_without_labels():
    registry = CollectorRegistry()
    plain = Histogram("compat_plain", "test", registry=registry)
    labelled = Histogram("compat_labelled", "test", labelnames=["kind"], registry=registry)

    metric_measure(plain, 1.5)
    metric_measure(labelled, 2.0, {"kind": "a"})
    metric_measure(labelled, 3.0, ["b"])
    metric_measure(None, 4.0)  # no metric (prometheus-client missing): nothing happens

    assert registry.get_sample_value("compat_plain_sum") == 1.5
    assert registry.get_sample_value("compat_labelled_sum", {"kind": "a"}) == 2.0
    assert registry.get_sample_value("compat_labelled_sum", {"kind": "b"}) == 3.0


# -- guillotina_amqp.amqp ----------------------------------------------------------------------


async def test_get_connection_is_the_originals_tuple_of_this_loops_connection(guillotina_main):
    channel, transport, protocol = await get_connection()
    assert channel.is_open and not transport.is_closing()
    assert await get_connection() == (channel, transport, protocol)  # the same, kept

    found = await channel.queue_declare(get_settings().queue, passive=True)  # declared already
    assert found["queue"] == get_settings().queue
    await add_task("tests.app.add", 1, 2)
    assert (await get_connection()).protocol is protocol  # add_task published on it

    await channel.close()
    again = await get_connection()
    assert again.channel is not channel and again.channel.is_open and again.protocol is protocol

    await remove_connection()
    assert transport.is_closing()
    fresh = await get_connection()
    assert fresh.protocol is not protocol and fresh.channel.is_open
    await remove_connection()
    await remove_connection()  # nothing left to remove: no error


# -- guillotina_amqp.api -----------------------------------------------------------------------


async def test_can_debug_amqp_follows_the_debug_permission(container_requester):
    async with container_requester as requester:
        container = await enter_container(requester)
        assert can_debug_amqp(container) is True  # root
        assert can_debug_amqp() is True  # the current container by default
        manager = GuillotinaUser(user_id="bob", roles={"tests.AMQPManager": 1})
        set_authenticated_user(manager)  # guillotina.ManageAMQP without guillotina.DebugAMQP
        assert can_debug_amqp(container) is False
        set_authenticated_user(RootUser("root"))


# -- guillotina_amqp.job.Job -------------------------------------------------------------------


async def test_job_takes_the_original_call_shape(guillotina_main):
    data = message(str(uuid.uuid4()))
    channel, envelope = object(), object()

    job = Job(None, data, channel, envelope)

    assert job.function_name == "tests.app.add"
    assert job.data is data and job.task_id == data["task_id"]
    assert job.channel is channel and job.envelope is envelope and job.base_request is None
    assert job.settings == get_settings() and job.state_manager is get_state_manager()
    assert await job.run() is Outcome.FINISHED
    assert job.result == 5


async def test_job_function_name_of_an_object_task(guillotina_main):
    data = message("id", "guillotina_amqp.utils._run_object_task", ["tests.app.set_title", "/item", "T"])
    job = Job(data, get_settings(), get_state_manager())
    assert job.function_name == "run_object_task/tests.app.set_title"
    assert job.channel is None and job.envelope is None


# -- guillotina_amqp.worker.Worker -------------------------------------------------------------


async def test_worker_queue_names(worker):
    queue = get_settings().queue
    assert (worker.queue_main, worker.queue_delayed, worker.queue_errored) == (
        queue,
        f"{queue}-delay",
        f"{queue}-error",
    )
    # called with a channel, the original's way to count a queue's messages and consumers
    channel, _, _ = await get_connection()
    main = await worker.queue_main(channel)
    assert (main["queue"], main["consumer_count"]) == (queue, 1)
    assert (await worker.queue_errored(channel))["message_count"] == 0


async def test_original_worker_attributes(guillotina_main):
    worker = Worker()
    assert worker._max_running == worker.max_size == get_settings().max_running_tasks
    assert (worker.num_running, worker.total_run, worker.total_errored) == (0, 0, 0)


async def test_handle_queued_job_as_a_consumer_callback(worker):
    """The original's consumers called handle_queued_job; it returns once the task is settled."""
    task_id = str(uuid.uuid4())
    seen_on_return: list[str] = []

    async def consume(channel, body, envelope, properties):
        await worker.handle_queued_job(channel, body, envelope, properties)
        seen_on_return.append(await TaskState(task_id).get_status())

    channel, _, protocol = await get_connection()
    side_queue = (await channel.queue_declare("", exclusive=True))["queue"]  # gone with the connection
    await channel.basic_consume(consume, queue_name=side_queue)
    await channel.publish(orjson.dumps(message(task_id)), "", side_queue)

    await wait_for(lambda: seen_on_return, what="the consumer callback to return")
    assert seen_on_return == [TaskStatus.FINISHED]
    assert await TaskState(task_id).get_result() == 5
    check = await (await protocol.channel()).queue_declare(side_queue, passive=True)
    assert check["message_count"] == 0  # acked, not left for redelivery


async def test_last_activity_and_check_activity(worker):
    assert worker.check_activity  # the constructor's flag, on by default
    assert time.time() - 60 < worker.last_activity <= time.time()

    worker.last_activity = time.time() - worker.settings.noop_after - 1
    assert await worker.check_activity() is True
    assert worker.activity.probes_sent == 1
    # settled too: a delivery still being handled keeps the worker busy, so not idle
    await wait_for(lambda: worker.activity.probes_back == 1 and not worker._handlers, what="the probe back")
    assert time.time() - 60 < worker.last_activity  # the probe's delivery counts as activity

    worker.last_activity = time.time() - worker.settings.kill_after - 1
    assert await worker.check_activity() is False
    assert worker.exit_code == EXIT_IDLE and worker.failed.is_set()


async def test_check_activity_off_tracks_activity_and_runs_the_originals_loop(guillotina_main):
    async with running_worker(check_activity=False) as worker:
        assert not worker.check_activity and worker._activity_task is None
        assert time.time() - 60 < worker.last_activity <= time.time()  # tracked all the same

        worker.last_activity = idle_since = time.time() - 10
        # the original's call: a loop with its own pace and limits, owned by the worker once assigned
        worker._activity_task = asyncio.ensure_future(
            worker.check_activity(check_every=0.05, noop_after=1, kill_after=500)
        )
        await wait_for(lambda: worker.activity.probes_back >= 1, what="the loop's probe to come back")
        assert worker.last_activity > idle_since
    assert worker._activity_task.cancelled()  # stopping the worker stopped the loop


# -- amqp.connection_factory -------------------------------------------------------------------

FACTORY_CALLS: list[dict] = []


async def connect_with_aioamqp_013_signature(
    host="localhost",
    port=None,
    login="guest",
    password="guest",
    virtualhost="/",
    ssl=None,
    login_method="PLAIN",
    insist=False,
    protocol_factory=aioamqp.AmqpProtocol,
    verify_ssl=True,
    loop=None,
    **kwargs,
):
    """A factory as written for the original: aioamqp.connect's older signature."""
    FACTORY_CALLS.append({"host": host, "port": port, "virtualhost": virtualhost, **kwargs})
    return await aioamqp.connect(
        host, port, login, password, virtualhost, ssl, login_method, insist, **kwargs
    )


async def connect_with_broker_arguments_only(host, port, login, password, virtualhost):
    """A factory that names only the broker's address and credentials."""
    FACTORY_CALLS.append({"host": host, "port": port, "virtualhost": virtualhost})
    return await aioamqp.connect(
        host=host, port=port, login=login, password=password, virtualhost=virtualhost
    )


@pytest.mark.parametrize(
    "factory", ["connect_with_aioamqp_013_signature", "connect_with_broker_arguments_only"]
)
async def test_connection_factory_with_the_originals_call_shape(guillotina_main, monkeypatch, factory):
    FACTORY_CALLS.clear()
    monkeypatch.setitem(app_settings["amqp"], "connection_factory", f"{__name__}.{factory}")
    async with running_worker():
        final = await (await add_task("tests.app.add", 4, 5)).join()
    assert final["status"] == TaskStatus.FINISHED and final["result"] == 9
    settings = get_settings()
    assert FACTORY_CALLS and all(call["port"] == settings.port for call in FACTORY_CALLS)
    if factory == "connect_with_aioamqp_013_signature":
        assert FACTORY_CALLS[0]["heartbeat"] == settings.heartbeat  # the rest reach its **kwargs
