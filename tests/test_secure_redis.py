"""The task state on a Redis that wants a password (or an ACL user), and on one that speaks TLS.

Real `redis-server`s (tests/secure_redis.py) and real `g amqp-worker` processes: a task
scheduled over REST runs end to end; credentials or certificates that are wrong stop the
worker at start-up with one line naming the setting; no secret shows up anywhere.
"""

import json
from typing import Any

import pytest
from guillotina import app_settings
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError

from guillotina_amqp import add_task, names
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from tests import app
from tests.secure_redis import (
    AUTH_PORT,
    CERTS,
    PASSWORD,
    SENTINEL_MASTER,
    SENTINEL_PORT,
    TLS_PORT,
    USER_PASSWORD,
    USERNAME,
    redis_block,
    tls_block,
)
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.test_operations import amqp_tasks, call
from tests.test_settings_errors import assert_one_clear_line, failed_start
from tests.utils import logged, wait_for

AUTH_BLOCKS = {
    "password-and-db": redis_block(AUTH_PORT, password=PASSWORD, db=2),
    "acl-user": redis_block(AUTH_PORT, username=USERNAME, password=USER_PASSWORD),
    # the url wins over host and port: nothing listens on port 1
    "url": redis_block(1, url=f"redis://{USERNAME}:{USER_PASSWORD}@127.0.0.1:{AUTH_PORT}/3"),
}
#: the database each block names
AUTH_DBS = {"password-and-db": 2, "acl-user": 0, "url": 3}
TLS_BLOCKS = {
    "ssl-settings": tls_block(),
    "rediss-url": tls_block(url=f"rediss://:{PASSWORD}@localhost:{TLS_PORT}/1", port=1),
}
SECRETS = (PASSWORD, USER_PASSWORD)
#: seconds a task may take to run on a worker process (a failure, not a hang, past it)
JOIN_TIMEOUT = 120


def with_redis(blocks: dict[str, dict]) -> Any:
    """Parametrize a test over the names of `redis` blocks, each block its app_settings mark."""
    return pytest.mark.parametrize(
        "case",
        [
            pytest.param(name, id=name, marks=pytest.mark.app_settings({"redis": b}))
            for name, b in blocks.items()
        ],
    )


async def schedule_over_rest(requester: Any) -> str:
    body, status = await requester("POST", "/db/guillotina/@test-schedule", data=json.dumps({}))
    assert status == 200, body
    return body["task_id"]


async def run_one_task(requester: Any) -> tuple[str, dict]:
    async with WorkerProcess(worker_config()) as worker:
        await worker.wait_consuming()
        task_id = await schedule_over_rest(requester)
        final = await TaskState(task_id).join(timeout=JOIN_TIMEOUT)
    assert final["status"] == TaskStatus.FINISHED, (final, worker.output)
    assert final["result"]["container"] == "guillotina"
    assert_no_secret(worker.output)
    return task_id, final


def assert_no_secret(*texts: Any) -> None:
    for text in texts:
        shown = text if isinstance(text, str) else json.dumps(text)
        for secret in SECRETS:
            assert secret not in shown, shown


@with_redis(AUTH_BLOCKS)
async def test_a_task_scheduled_over_rest_runs_on_a_redis_with_a_password(
    pg_database, auth_redis, case, container_requester
):
    async with container_requester as requester:
        task_id, _ = await run_one_task(requester)
        shown, status = await requester("GET", f"/db/guillotina/@amqp-tasks/{task_id}")
    assert status == 200 and shown["status"] == TaskStatus.FINISHED, shown
    # the state is on the database the settings name, of the server that wants the password
    client = Redis(port=AUTH_PORT, password=PASSWORD, db=AUTH_DBS[case])
    try:
        assert await client.exists(names.state_key(app_settings["redis_prefix_key"], task_id))
    finally:
        await client.aclose()


@with_redis(TLS_BLOCKS)
async def test_a_task_scheduled_over_rest_runs_on_a_redis_over_tls(
    pg_database, tls_redis, case, container_requester
):
    async with container_requester as requester:
        task_id, final = await run_one_task(requester)
        # and the worker's own announcement went over TLS too
        workers, status = await requester("GET", "/db/guillotina/@amqp-workers")
    assert status == 200, workers
    assert_no_secret(final, workers)


BAD_CREDENTIALS = {
    "wrong-password": ({"password": "wrong-pw-secret"}, {}, ["redis.password"]),
    "no-password": ({}, {}, ["redis.password"]),
    "wrong-acl-password": ({"username": USERNAME, "password": "wrong-pw-secret"}, {}, ["redis.username"]),
    # given by the environment alone, as a container deployment would
    "env-password": ({}, {"G_REDIS__PASSWORD": "wrong-pw-secret"}, ["G_REDIS__PASSWORD"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CREDENTIALS))
async def test_wrong_credentials_stop_the_worker_with_one_line(auth_redis, guillotina_main, case):
    settings, env, named = BAD_CREDENTIALS[case]
    config = worker_config(persistent_manager="redis")
    config["redis"] = redis_block(AUTH_PORT, **settings)
    code, output = await failed_start(config, env=env)
    assert code != 0, output
    assert_one_clear_line(output, ["refused the credentials", f"127.0.0.1:{AUTH_PORT}", *named])
    assert "wrong-pw-secret" not in output
    assert "Backing off" not in output, "refused credentials are not retried"


async def test_an_untrusted_redis_certificate_stops_the_worker(tls_redis, guillotina_main):
    config = worker_config(persistent_manager="redis")
    config["redis"] = tls_block(ssl_ca_certs=str(CERTS / "untrusted-ca.pem"))
    code, output = await failed_start(config)
    assert code != 0, output
    assert_one_clear_line(output, ["TLS to Redis", "redis.ssl_ca_certs", "certificate verify failed"])
    assert_no_secret(output)


# a signing key is a secret too; a failed task's error text is checked with the rest
@pytest.mark.app_settings({"redis": tls_block(), "amqp": {"signing_key": PASSWORD, "max_task_retries": 0}})
async def test_no_secret_in_logs_rest_command_or_state(pg_database, tls_redis, container_requester, tmp_path):
    config = worker_config()
    async with container_requester as requester:
        async with WorkerProcess(config) as worker:
            await worker.wait_consuming()
            tasks = [await call(requester, "noop"), await call(requester, "fail", "boom")]
            states = [await TaskState(task_id).join(timeout=JOIN_TIMEOUT) for task_id in tasks]
            workers, _ = await requester("GET", "/db/guillotina/@amqp-workers")
            listing, _ = await requester("GET", "/db/guillotina/@amqp-tasks?limit=50")
            shown = [(await requester("GET", f"/db/guillotina/@amqp-tasks/{t}"))[0] for t in tasks]
            page, _ = await requester("GET", "/db/guillotina/@amqp-dashboard")
            (tmp_path / "config.yaml").write_text(json.dumps(config))
            command = [await amqp_tasks(tmp_path, *args) for args in (["list"], ["workers", "--json"])]
    assert [s["status"] for s in states] == [TaskStatus.FINISHED, TaskStatus.ERRORED]
    assert "boom" in states[1]["error"]
    assert len(listing["items"]) == 2 and workers, (listing, workers)
    assert all(code == 0 for code, _, _ in command), command
    outputs = [out + err for _, out, err in command]
    assert_no_secret(worker.output, states, workers, listing, shown, str(page), *outputs)


@pytest.mark.app_settings({"redis": redis_block(AUTH_PORT, password="wrong-pw-secret")})
async def test_a_refused_password_fails_calls_at_once_and_stops_the_listener(
    auth_redis, guillotina_main, caplog
):
    manager = get_state_manager()
    with pytest.raises(AuthenticationError):
        await manager.get("task-never-made")
    async with manager.watch("t"):
        await wait_for(lambda: logged(caplog, "Task state listener", "refused the credentials"), 60)
    assert not logged(caplog, "resubscribing"), "refused credentials are not retried"
    assert "wrong-pw-secret" not in caplog.text


SENTINEL_BLOCK = {
    "sentinels": [f"127.0.0.1:{SENTINEL_PORT}"],
    "master_name": SENTINEL_MASTER,
    "password": PASSWORD,
}


@pytest.mark.app_settings({"redis": SENTINEL_BLOCK})
async def test_the_sentinel_path_logs_in_to_the_master_it_names(sentinel_redis, worker, outside_container):
    # the state scripts' pipe, the listener behind join() and redis-py's client: all on the master
    state = await add_task(app.add, 2, 2)
    final = await state.join(timeout=JOIN_TIMEOUT)
    assert final["status"] == TaskStatus.FINISHED and final["result"] == 4
    client = Redis(port=AUTH_PORT, password=PASSWORD)
    try:
        assert await client.exists(names.state_key(app_settings["redis_prefix_key"], state.task_id))
    finally:
        await client.aclose()
