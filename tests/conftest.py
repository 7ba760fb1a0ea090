"""Test set-up: real RabbitMQ, Redis (and PostgreSQL where needed), isolated per test.

Each test gets its own exchange, queue names and Redis key prefix, so tests
never see each other's messages or state.
"""

import asyncio
import copy
import logging
import os
import uuid
from typing import Any

for _name, _default in (
    ("RABBITMQ", "127.0.0.1:5672"),
    ("REDIS", "127.0.0.1:6379"),
    ("POSTGRESQL", "127.0.0.1:5432"),
):
    os.environ.setdefault(_name, _default)

import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402
from guillotina import testing  # noqa: E402
from guillotina.tests import fixtures as guillotina_fixtures  # noqa: E402
from guillotina.utils import merge_dicts  # noqa: E402

pytest_plugins = [
    "pytest_docker_fixtures",
    "guillotina.tests.fixtures",
    "tests.own_redis",
    "tests.secure_redis",
]

# tests/ha needs the engines scripts/ha-engines.sh starts: `make test-ha` runs it; tests/tls
# the TLS node of scripts/tls-engines.sh: `make test-tls`
collect_ignore = [] if os.environ.get("GUILLOTINA_AMQP_HA") else ["ha"]
collect_ignore += [] if os.environ.get("GUILLOTINA_AMQP_TLS") else ["tls"]
# tests/long the short-consumer_timeout node of scripts/ct-engine.sh: `make test-long`
collect_ignore += [] if os.environ.get("GUILLOTINA_AMQP_LONG") else ["long"]

NAMESPACE: dict[str, str] = {"id": "unset", "manager": "redis"}  # "pg": database name, when used


def _hostport(name: str) -> tuple[str, int]:
    host, _, port = os.environ[name].partition(":")
    return host, int(port)


def amqp_settings(namespace: str, manager: str) -> dict:
    host, port = _hostport("RABBITMQ")
    return {
        "host": host,
        "port": port,
        "exchange": f"test-{namespace}",
        "queue": f"test-{namespace}",
        "persistent_manager": manager,
        "delayed_ttl_ms": 1000,
        "errored_ttl_ms": 60000,
        "update_status_interval": 0.2,
        "heartbeat": 30,
    }


def base_settings(settings: dict) -> None:
    settings["applications"] = [
        *settings.get("applications", []),
        "guillotina_amqp",
        "guillotina.contrib.redis",
        "tests.app",
    ]
    host, port = _hostport("REDIS")
    settings["redis"] = {"host": host, "port": port, "pool": {"minsize": 1, "maxsize": 20}}
    settings["amqp"] = amqp_settings(NAMESPACE["id"], NAMESPACE["manager"])
    settings["redis_prefix_key"] = f"test-{NAMESPACE['id']}-"
    if NAMESPACE.get("pg"):
        settings["databases"]["db"] = pg_settings(NAMESPACE["pg"])


def pg_settings(dbname: str) -> dict:
    host, port = _hostport("POSTGRESQL")
    return {
        "storage": "postgresql",
        "dsn": {
            "scheme": "postgres",
            "dbname": dbname,
            "user": "postgres",
            "host": host,
            "port": port,
            "password": "",
        },
    }


testing.configure_with(base_settings)


def _marked_settings(settings: dict, pytest_node: Any) -> dict:
    """guillotina's own reading of `app_settings` marks, on a copy of each mark's dict.

    guillotina's merge_dicts writes the merged block back into its second argument, the
    mark's dict: every later test sharing the mark (each parametrization of a test) then
    got the first one's `amqp` block, its queue and key prefix included.
    """
    for mark in pytest_node.iter_markers(name="app_settings") if pytest_node else ():
        settings = merge_dicts(settings, copy.deepcopy(mark.args[0]))
    return settings


guillotina_fixtures._update_from_pytest_markers = _marked_settings


@pytest.fixture(autouse=True)
def namespace(request: pytest.FixtureRequest) -> str:
    """A fresh queue/exchange/key namespace; `manager` param picks the state manager."""
    NAMESPACE["id"] = uuid.uuid4().hex[:12]
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    NAMESPACE["manager"] = params.get("manager", "redis")
    return NAMESPACE["id"]


@pytest.fixture
def pg_database(namespace):
    """A fresh PostgreSQL database as the app's "db" (for content shared with worker processes).

    Request it BEFORE the guillotina fixtures (first in the test's arguments).
    """
    import psycopg2

    host, port = _hostport("POSTGRESQL")
    name = f"amqp_{namespace}"
    conn = psycopg2.connect(dbname="postgres", user="postgres", host=host, port=port)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    NAMESPACE["pg"] = name
    yield name
    NAMESPACE.pop("pg", None)
    conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest_asyncio.fixture(autouse=True)
async def _cleanup(event_loop, namespace):
    """Drop this test's queues, Redis keys and connections once it is done."""
    yield
    from tests import utils

    await utils.cleanup_namespace(namespace)


@pytest_asyncio.fixture
async def served(app) -> tuple[str, int]:
    """guillotina's `app` (the API over HTTP), once its socket accepts connections.

    `app` returns when the application has started, and uvicorn binds its socket only after
    that: a request sent at once can be refused.
    """
    from tests.utils import wait_for

    host, port = app

    async def accepts() -> bool:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    await wait_for(accepts, what=f"the API to listen on {host}:{port}")
    return host, port


@pytest_asyncio.fixture
async def worker(guillotina_main):
    """A worker consuming this test's queue, in the test's process and loop."""
    from tests.utils import running_worker

    async with running_worker() as running:
        yield running


@pytest.fixture
def outside_container():
    """Schedule as code running outside any request, container or database."""
    from guillotina import task_vars

    for var in (task_vars.request, task_vars.container, task_vars.db):
        var.set(None)


@pytest.fixture
def info_logs(caplog):
    """Capture guillotina_amqp's INFO lines too (tests that count what the worker logged)."""
    caplog.set_level(logging.INFO, "guillotina_amqp")
    return caplog
