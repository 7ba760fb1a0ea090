"""The fixed contract: docs/settings.md (defaults), docs/design.md#queues and #messages.

Applications and workers of the original plugin must keep working, so these
values are written out literally here rather than taken from the package.
"""

import contextlib
import json

import aioamqp
import pytest
from guillotina import app_settings

import guillotina_amqp
from guillotina_amqp import add_task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.worker import Worker
from tests import app
from tests.test_context import TOKEN_USERS, bearer, enter_container
from tests.utils import publish_raw, running_worker, wait_for

#: docs/settings.md: every default of the `amqp` block, plus the ones we added.
SPEC_DEFAULTS = {
    "connection_factory": "aioamqp.connect",
    "host": "localhost",
    "port": 5672,
    "login": "guest",
    "password": "guest",
    "vhost": "/",
    "heartbeat": 120,
    "exchange": "guillotina",
    "queue": "guillotina",
    "persistent_manager": "memory",
    "max_running_tasks": 20,
    "state_ttl": 86400,
    "max_task_retries": 5,
    "delayed_ttl_ms": 120000,
    "errored_ttl_ms": 604800000,
    "beaconttl": 30,
    # ours (docs/design.md#the-life-of-one-message, #liveness)
    "noop_after": 200,
    "kill_after": 300,
    "shutdown_timeout": 30,
    "update_status_interval": 20,
    "lock_ttl": 60,
    # ours (limits on hostile input, issue 16)
    "max_message_bytes": 1048576,
    "max_eventlog": 1000,
    # ours (beyond one machine, docs/operations.md#production-topology)
    "hosts": (),
    "queue_type": "classic",
    # ours (task control, docs/tasks.md)
    "task_timeout": None,
    "retry_backoff": False,
    "retry_backoff_max_ms": 3600000,
    "eager": False,
}

#: TTLs that differ from both the defaults and conftest's, to see them reach the queue arguments.
DELAYED_TTL_MS = 1500
ERRORED_TTL_MS = 90000
TTLS = pytest.mark.app_settings(
    {"amqp": {"delayed_ttl_ms": DELAYED_TTL_MS, "errored_ttl_ms": ERRORED_TTL_MS}}
)


# -- §2 settings defaults ----------------------------------------------------------------------


async def test_defaults_of_a_minimal_amqp_block(guillotina_main, monkeypatch):
    monkeypatch.setitem(app_settings, "amqp", {})
    monkeypatch.delitem(app_settings, "redis_prefix_key")

    settings = get_settings()

    assert {name: getattr(settings, name) for name in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert settings.redis_prefix_key == "amqpjobs-"
    assert guillotina_amqp.app_settings["redis_prefix_key"] == "amqpjobs-"

    worker = Worker()  # connects only in start()
    assert worker.update_status_interval == 20
    assert worker.max_task_retries == 5
    assert worker.max_size == 20


def test_the_add_on_publishes_every_default_in_app_settings():
    # docs/migrating.md: `app_settings["amqp"]` carries every default, as the original's did
    security = {
        "allowed_tasks": None,
        "signing_key": None,
        "previous_signing_keys": [],
        "replay_window": None,
        "http_tasks": {"allowed": [], "timeout": 30, "secrets": {}, "max_body_bytes": 1048576},
        "ssl": None,  # plain TCP unless amqp.ssl says TLS
    }
    as_configured = {**SPEC_DEFAULTS, "hosts": []}  # YAML and JSON have lists, not tuples
    assert guillotina_amqp.app_settings["amqp"] == {**as_configured, **security}
    assert guillotina_amqp.app_settings["redis_prefix_key"] == "amqpjobs-"


async def test_settings_given_override_the_defaults(guillotina_main, monkeypatch):
    block = {"host": "rabbit.example", "port": "5673", "max_task_retries": None, "queue": "jobs"}
    monkeypatch.setitem(app_settings, "amqp", block)
    monkeypatch.setitem(app_settings, "redis_prefix_key", "mine-")

    settings = get_settings()

    assert (settings.host, settings.port, settings.queue) == ("rabbit.example", 5673, "jobs")
    assert settings.exchange == "guillotina"
    assert settings.max_task_retries is None  # None = retry for ever
    assert settings.redis_prefix_key == "mine-"
    assert Worker().max_task_retries is None


# -- §3 topology -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker():
    """Our own AMQP connection, which declares nothing by itself (unlike the package's)."""
    settings = get_settings()
    transport, protocol = await aioamqp.connect(
        host=settings.host,
        port=settings.port,
        login=settings.login,
        password=settings.password,
        virtualhost=settings.vhost,
    )
    try:
        yield protocol
    finally:
        await protocol.close()
        transport.close()


def spec_queues(exchange: str, queue: str) -> dict[str, dict]:
    """docs/design.md#queues, literally: queue name -> its declaration arguments."""
    return {
        queue: {"x-dead-letter-exchange": exchange, "x-dead-letter-routing-key": f"{queue}-error"},
        f"{queue}-delay": {
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": queue,
            "x-message-ttl": DELAYED_TTL_MS,
        },
        f"{queue}-error": {"x-message-ttl": ERRORED_TTL_MS},
    }


async def assert_refused(protocol, declare, code: int = 406) -> None:
    """`declare(channel)` on a fresh channel is refused (406: PRECONDITION_FAILED)."""
    channel = await protocol.channel()
    with pytest.raises(aioamqp.ChannelClosed) as refused:
        await declare(channel)
    assert refused.value.code == code


async def assert_spec_topology(protocol, exchange: str, queue: str) -> None:
    """Re-declaring (actively) with the original's arguments succeeds; other arguments are refused."""
    expected = spec_queues(exchange, queue)
    channel = await protocol.channel()
    # RabbitMQ refuses an active re-declaration that differs in any way, so success = equality
    await channel.exchange_declare(exchange, "direct", durable=True)
    for name, arguments in expected.items():
        await channel.queue_declare(name, durable=True, arguments=arguments)
    await channel.close()

    main, delay, error = expected
    await assert_refused(protocol, lambda ch: ch.exchange_declare(exchange, "fanout", durable=True))
    await assert_refused(protocol, lambda ch: ch.exchange_declare(exchange, "direct", durable=False))
    await assert_refused(protocol, lambda ch: ch.queue_declare(main, durable=False, arguments=expected[main]))
    without_routing_key = {"x-dead-letter-exchange": exchange}
    await assert_refused(
        protocol, lambda ch: ch.queue_declare(main, durable=True, arguments=without_routing_key)
    )
    other_ttl = {**expected[delay], "x-message-ttl": DELAYED_TTL_MS + 1}
    await assert_refused(protocol, lambda ch: ch.queue_declare(delay, durable=True, arguments=other_ttl))
    other_ttl = {"x-message-ttl": ERRORED_TTL_MS + 1}
    await assert_refused(protocol, lambda ch: ch.queue_declare(error, durable=True, arguments=other_ttl))


async def message_count(protocol, queue: str) -> int:
    channel = await protocol.channel()
    try:
        return (await channel.queue_declare(queue, passive=True))["message_count"]
    finally:
        await channel.close()


async def counts_are(protocol, expected: dict[str, int]) -> bool:
    return {name: await message_count(protocol, name) for name in expected} == expected


@TTLS
async def test_add_task_declares_the_spec_topology(container_requester):
    settings = get_settings()
    exchange, queue = settings.exchange, settings.queue
    async with container_requester as requester, broker() as protocol:
        for name in spec_queues(exchange, queue):  # nothing declared them yet
            await assert_refused(protocol, lambda ch: ch.queue_declare(name, passive=True), code=404)

        await enter_container(requester)
        await add_task(app.noop)

        await assert_spec_topology(protocol, exchange, queue)
        # the task waits in the main queue: no worker ever ran
        assert await counts_are(protocol, {queue: 1, f"{queue}-delay": 0, f"{queue}-error": 0})


@TTLS
async def test_worker_declares_the_spec_topology(guillotina_main):
    settings = get_settings()
    async with running_worker(), broker() as protocol:
        await assert_spec_topology(protocol, settings.exchange, settings.queue)


@TTLS
async def test_queues_are_bound_and_dead_letter_as_specified(guillotina_main):
    settings = get_settings()
    queue, delay, error = settings.queue, f"{settings.queue}-delay", f"{settings.queue}-error"
    async with broker() as protocol:
        await publish_raw(b"to the error queue", routing_key=error)
        await wait_for(lambda: counts_are(protocol, {queue: 0, delay: 0, error: 1}), what="error bound")

        # the delay queue is bound under its name and dead-letters back to the main queue after its TTL
        await publish_raw(b"delayed", routing_key=delay)
        await wait_for(lambda: counts_are(protocol, {queue: 1, delay: 0, error: 1}), what="delay -> main")

        # a message rejected from the main queue dead-letters to the error queue
        channel = await protocol.channel()
        got = await channel.basic_get(queue)
        assert got["message"] == b"delayed"
        await channel.basic_reject(got["delivery_tag"], requeue=False)
        await wait_for(lambda: counts_are(protocol, {queue: 0, delay: 0, error: 2}), what="main -> error")


# -- §3 messages -------------------------------------------------------------------------------


async def take_one_message() -> tuple[dict, object]:
    """The one message waiting in the main queue: (decoded body, properties)."""
    settings = get_settings()
    async with broker() as protocol:
        channel = await protocol.channel()
        got = await channel.basic_get(settings.queue, no_ack=True)
        assert got["message_count"] == 0  # it was the only one
        assert (got["exchange_name"], got["routing_key"]) == (settings.exchange, settings.queue)
        return json.loads(got["message"]), got["properties"]


async def test_message_fields_of_add_task_in_a_container(container_requester):
    async with container_requester as requester:
        await enter_container(requester)
        state = await add_task(app.add, 1, b=2)

    body, properties = await take_one_message()

    assert properties.delivery_mode == 2  # persistent
    fields = {"func", "args", "kwargs", "db_id", "container_id", "task_id", "req_data"}
    assert fields <= set(body)
    assert body["func"] == "tests.app.add"
    assert (body["args"], body["kwargs"]) == ([1], {"b": 2})
    assert (body["db_id"], body["container_id"]) == ("db", "guillotina")
    assert body["task_id"] == state.task_id
    req_data = body["req_data"]
    assert {"url", "method", "headers", "annotations", "container_url", "user"} <= set(req_data)
    assert {"id", "roles", "groups", "headers", "data"} <= set(req_data["user"])
    assert req_data["user"]["id"] == "root"
    assert req_data["container_url"].endswith("/db/guillotina")


@TOKEN_USERS
async def test_message_carries_the_scheduling_request_and_user(container_requester):
    async with container_requester as requester:
        response, status = await requester(
            "POST",
            "/db/guillotina/@test-context",
            data=json.dumps({"annotation": "noted"}),
            token=bearer("alice", ["tests.Scheduler"], ["editors"]),
            auth_type="Bearer",
            headers={"X-Custom": "custom-value"},
        )
        assert status == 200, response

    body, properties = await take_one_message()

    assert properties.delivery_mode == 2
    assert body["func"] == "tests.app.request_info"
    assert body["task_id"] == response["task_id"]
    assert (body["db_id"], body["container_id"]) == ("db", "guillotina")
    req_data = body["req_data"]
    assert req_data["url"].endswith("/db/guillotina/@test-context")
    assert req_data["method"] == "POST"
    headers = {name.lower(): value for name, value in req_data["headers"].items()}
    assert headers["x-custom"] == "custom-value"
    assert req_data["annotations"]["test-annotation"] == "noted"
    assert req_data["container_url"].endswith("/db/guillotina")
    user = req_data["user"]
    assert user["id"] == "alice"
    assert "tests.Scheduler" in user["roles"]
    assert user["groups"] == ["editors"]
    assert isinstance(user["headers"], dict) and isinstance(user["data"], dict)
