"""Security (docs/security.md, issue 5): each test attempts an attack or a leak and asserts it failed safely.

- only registered/allowed functions run; refused ones are never imported nor called;
- with a signing key, unsigned, tampered and retired-key messages are refused;
- credentials never reach the state store, REST responses or logs;
- REST serves a container's own tasks only, to the right permissions.
"""

import dataclasses
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from guillotina import testing
from guillotina.auth.users import GuillotinaUser
from guillotina.auth.utils import authenticate_user
from guillotina.interfaces import Allow

from guillotina_amqp import add_task, liveness, names, registry
from guillotina_amqp import message as messages
from guillotina_amqp.exceptions import InvalidMessage, TaskNotAllowed
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus, get_state_manager
from guillotina_amqp.state.manager import initial_state, is_valid_task_id
from tests import app
from tests.utils import error_queue_count, publish_raw, queue_counts, wait_for

FORBIDDEN_MODULE = "tests.forbidden_module"
IMPORTED_FLAG = "GUILLOTINA_AMQP_FORBIDDEN_MODULE_IMPORTED"  # set by importing it; never import it here
NOT_FOUND = {"reason": "Task not found"}


# -- helpers ------------------------------------------------------------------
def task_message(func: str, *args: Any, roles: list[str] | None = None, **kwargs: Any) -> dict:
    """A message as add_task would publish it outside a container, naming any function."""
    req_data = messages.request_data(None, None)
    req_data["user"].update({"id": "someone", "roles": roles or ["guillotina.Member"]})
    return {
        "func": func,
        "args": list(args),
        "kwargs": kwargs,
        "db_id": None,
        "container_id": None,
        "task_id": str(uuid.uuid4()),
        "req_data": req_data,
    }


async def publish(message: dict, body: bytes | None = None, headers: dict | None = None) -> str:
    """Record the task `scheduled` (as add_task does) and publish it straight to the queue."""
    await get_state_manager().create(message["task_id"], initial_state())
    await publish_raw(body if body is not None else orjson.dumps(message), headers)
    return message["task_id"]


async def wait_error_queue(count: int = 1) -> None:
    await wait_for(lambda: _has_errors(count), timeout=60, what=f"{count} message(s) in the error queue")


async def _has_errors(count: int) -> bool:
    return await error_queue_count() >= count


async def wait_status(task_id: str, status: str) -> dict:
    async def reached() -> dict | None:
        state = await get_state_manager().get(task_id)
        return state if state.get("status") == status else None

    return await wait_for(reached, timeout=60, what=f"task {task_id} to be {status}")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that exists only if some refused code ran."""
    return tmp_path / "side-effect"


@pytest.fixture
def forbidden_unimported() -> None:
    sys.modules.pop(FORBIDDEN_MODULE, None)
    os.environ.pop(IMPORTED_FLAG, None)
    yield
    sys.modules.pop(FORBIDDEN_MODULE, None)
    os.environ.pop(IMPORTED_FLAG, None)


# -- only registered tasks run ------------------------------------------------
async def test_application_function_runs_through_plain_add_task(worker, marker):
    state = await add_task(app.write_marker, str(marker))
    final = await state.join()
    assert final["status"] == TaskStatus.FINISHED, final
    assert marker.read_text() == "ran\n"


def _attacks(marker: Path) -> dict[str, list]:
    return {
        "os.system": [f"touch {marker}"],
        "builtins.eval": [f"open({str(marker)!r}, 'w').write('x')"],
        "subprocess.run": [["touch", str(marker)]],
        f"{FORBIDDEN_MODULE}.write_marker": [str(marker)],
        # a name inside an allowed module that is really someone else's function
        "tests.app.get_authenticated_user": [],
        # an object task whose callable is not allowed
        "guillotina_amqp.utils._run_object_task": ["os.system", "/", f"touch {marker}"],
    }


@pytest.mark.parametrize(
    "func",
    [
        "os.system",
        "builtins.eval",
        "subprocess.run",
        f"{FORBIDDEN_MODULE}.write_marker",
        "tests.app.get_authenticated_user",
        "guillotina_amqp.utils._run_object_task",
    ],
)
async def test_function_outside_allowlist_is_refused(worker, marker, forbidden_unimported, caplog, func):
    args = _attacks(marker)[func]
    refused_name = args[0] if func.endswith("_run_object_task") else func
    with caplog.at_level(logging.WARNING, logger="guillotina_amqp"):
        task_id = await publish(task_message(func, *args))
        state = await wait_status(task_id, TaskStatus.ERRORED)
        await wait_error_queue()
    assert refused_name in state["error"], state
    assert "refused" in state["error"]
    assert not marker.exists(), "refused code ran"
    assert FORBIDDEN_MODULE not in sys.modules and IMPORTED_FLAG not in os.environ
    assert any(refused_name in r.getMessage() and task_id in r.getMessage() for r in caplog.records), (
        caplog.text
    )
    assert (await error_queue_count()) == 1
    # the refused message is not retried: nothing went to the delay queue
    assert (await queue_counts())[names.delay_queue(get_settings().queue)] == 0


@pytest.mark.app_settings({"amqp": {"allowed_tasks": ["tests.app.add"]}})
async def test_allowed_tasks_setting_narrows_the_allowlist(worker, marker):
    assert (await (await add_task(app.add, 1, 2)).join())["result"] == 3
    # registered with @task: runs even though not under allowed_tasks
    assert (await (await app.decorated_add(2, 2)).join())["result"] == 4
    refused = await wait_status((await add_task(app.write_marker, str(marker))).task_id, TaskStatus.ERRORED)
    assert "tests.app.write_marker" in refused["error"]
    assert not marker.exists()


async def test_prefixes_match_on_dotted_boundaries(guillotina_main):
    settings = dataclasses.replace(get_settings(), allowed_tasks=("tests.app", "pkg."))
    assert registry.is_allowed("tests.app.add", settings)
    assert registry.is_allowed("pkg.tasks.f", settings)
    for name in (
        "tests.application.f",
        "tests.app_x.f",
        "tests.forbidden_module.write_marker",
        "tests.f",
        "pkgx.f",
        "os.system",
    ):
        assert not registry.is_allowed(name, settings), name
        with pytest.raises(TaskNotAllowed, match=name.replace(".", r"\.")):
            registry.resolve(name, settings)


async def test_default_allowlist_is_the_applications_and_the_object_task_wrappers(guillotina_main):
    settings = get_settings()
    assert settings.allowed_tasks is None
    assert set(registry.allowed_prefixes(settings)) >= {"tests.app", "guillotina.contrib.redis"}
    assert "guillotina_amqp" not in registry.allowed_prefixes(settings)
    for internal in (
        "guillotina_amqp.utils.add_task",
        "guillotina_amqp.metrics.start_server",
        "guillotina_amqp.commands.worker.WorkerCommand",
    ):
        with pytest.raises(TaskNotAllowed):
            registry.resolve(internal, settings)
    # object task wrappers keep working when allowed_tasks is set explicitly
    narrowed = dataclasses.replace(settings, allowed_tasks=())
    for wrapper in ("guillotina_amqp.utils._run_object_task", "guillotina_amqp.utils._yield_object_task"):
        assert callable(registry.resolve(wrapper, narrowed))
    with pytest.raises(TaskNotAllowed):
        registry.resolve("tests.app.add", narrowed)


@pytest.mark.parametrize("name", [None, 3, "", "nodots", "tests.app.", ".tests.app.add", "tests..app.add"])
async def test_malformed_function_names_are_refused(guillotina_main, name):
    with pytest.raises(InvalidMessage):
        registry.resolve(name, get_settings())


# -- signed messages ----------------------------------------------------------
# Keys are set by a fixture, not an app_settings marker: guillotina's merge_dicts
# writes the merged block back into the marker's dict, so a marker shared by
# parametrized tests would carry the first test's queue names into the next ones.
@pytest.fixture
def signing_keys() -> dict:
    return {"signing_key": "current-key", "previous_signing_keys": ["previous-key"]}


@pytest_asyncio.fixture
async def signed_worker(guillotina_main, signing_keys):
    from guillotina import app_settings

    from tests.utils import running_worker

    app_settings["amqp"] = {**app_settings["amqp"], **signing_keys}
    async with running_worker() as running:
        yield running


def signed(body: bytes, key: str) -> dict:
    return {messages.SIGNATURE_HEADER: messages.signature(body, key)}


async def test_signed_add_task_runs(signed_worker, marker):
    final = await (await add_task(app.write_marker, str(marker))).join()
    assert final["status"] == TaskStatus.FINISHED
    assert marker.exists()


async def test_message_signed_with_previous_key_still_runs(signed_worker, marker):
    message = task_message("tests.app.write_marker", str(marker))
    body = orjson.dumps(message)
    task_id = await publish(message, body, signed(body, "previous-key"))
    await wait_status(task_id, TaskStatus.FINISHED)
    assert marker.exists()


def _tampered(marker: Path) -> tuple[dict, bytes, dict]:
    """A message signed as a Member, then edited to claim Manager."""
    message = task_message("tests.app.write_marker", str(marker), roles=["guillotina.Member"])
    body = orjson.dumps(message)
    headers = signed(body, "current-key")
    tampered = body.replace(b'"guillotina.Member"', b'"guillotina.Manager"')
    assert tampered != body
    return message, tampered, headers


def _unsigned(marker: Path) -> tuple[dict, bytes, dict]:
    message = task_message("tests.app.write_marker", str(marker))
    return message, orjson.dumps(message), {}


def _retired_key(marker: Path) -> tuple[dict, bytes, dict]:
    message = task_message("tests.app.write_marker", str(marker))
    body = orjson.dumps(message)
    return message, body, signed(body, "retired-key")


def _garbage_signature(marker: Path) -> tuple[dict, bytes, dict]:
    message = task_message("tests.app.write_marker", str(marker))
    return message, orjson.dumps(message), {messages.SIGNATURE_HEADER: "not-a-signature"}


@pytest.mark.parametrize("forge", [_tampered, _unsigned, _retired_key, _garbage_signature])
async def test_badly_signed_message_is_refused(signed_worker, marker, caplog, forge):
    message, body, headers = forge(marker)
    with caplog.at_level(logging.WARNING, logger="guillotina_amqp"):
        task_id = await publish(message, body, headers)
        await wait_error_queue()
    assert not marker.exists(), "a badly signed message ran"
    # refused before decoding: its (unauthenticated) task id is not trusted to touch any state
    assert (await get_state_manager().get(task_id))["status"] == TaskStatus.SCHEDULED
    assert "sign" in caplog.text
    assert (await error_queue_count()) == 1


async def test_unsigned_noop_probe_is_refused_not_forwarded(signed_worker):
    # a forged probe must not make workers re-publish, and sign, what a stranger queued
    await publish_raw(liveness.probe_body("another-worker", hops=0), {liveness.PROBE_HEADER: "1"})
    await wait_error_queue()
    assert signed_worker.probes_forwarded == 0


async def test_signed_noop_probe_of_another_worker_is_forwarded(signed_worker):
    body = liveness.probe_body("another-worker", hops=liveness.MAX_PROBE_HOPS - 1)
    await publish_raw(body, {liveness.PROBE_HEADER: "1", **signed(body, "current-key")})
    await wait_for(lambda: _forwarded(signed_worker), timeout=30, what="the probe to be sent on")
    assert (await error_queue_count()) == 0


async def _forwarded(worker) -> bool:
    return worker.probes_forwarded > 0


@pytest.mark.parametrize("signing_keys", [{"signing_key": "new-key", "previous_signing_keys": []}])
async def test_rotation_completed_refuses_the_old_key(signed_worker, marker):
    message = task_message("tests.app.write_marker", str(marker))
    body = orjson.dumps(message)
    await publish(message, body, signed(body, "current-key"))
    await wait_error_queue()
    assert not marker.exists()


def test_signature_checks_the_exact_body():
    body = b'{"func":"tests.app.add"}'
    settings = dataclasses.replace(_settings_stub(), signing_key="k", previous_signing_keys=("old",))
    messages.verify(body, signed(body, "k"), settings)
    messages.verify(body, signed(body, "old"), settings)
    for headers in (
        {},
        None,
        signed(body + b" ", "k"),
        signed(body, "other"),
        {messages.SIGNATURE_HEADER: ""},
    ):
        with pytest.raises(InvalidMessage):
            messages.verify(body, headers, settings)
    # bytes header values (as some clients send them) are accepted too
    raw = {messages.SIGNATURE_HEADER: messages.signature(body, "k").encode()}
    messages.verify(body, raw, settings)


def _settings_stub():
    from guillotina_amqp.settings import DEFAULTS, AMQPSettings

    values = {**DEFAULTS, "allowed_tasks": None, "previous_signing_keys": ()}
    return AMQPSettings(**values)


# -- secrets at rest ----------------------------------------------------------
SECRET_COOKIE = "session=secret-cookie-value"


def _leaks(text: str) -> list[str]:
    secrets = (testing.ADMIN_TOKEN, "secret-cookie-value", "leaked-token", "leaked-cookie")
    return [secret for secret in secrets if secret in text]


async def test_credentials_never_stored_nor_served(container_requester, worker, caplog):
    caplog.set_level(logging.DEBUG)
    async with container_requester as requester:
        body, status = await requester(
            "POST", "/db/guillotina/@test-schedule", data="{}", headers={"Cookie": SECRET_COOKIE}
        )
        assert status == 200, body
        final = await TaskState(body["task_id"]).join()
        assert final["status"] == TaskStatus.FINISHED, final
        # the worker still logged the user in without the credentials
        assert final["result"]["user"] == "root"
        stored = await get_state_manager().get(body["task_id"])
        assert stored["job_data"]["req_data"]["headers"], "request headers were expected in job_data"
        assert _leaks(json.dumps(stored)) == []
        served, status = await requester("GET", f"/db/guillotina/@amqp-tasks/{body['task_id']}")
        assert status == 200 and "job_data" in served
        assert _leaks(json.dumps(served)) == []
    assert _leaks(caplog.text) == []


async def test_credentials_in_old_messages_are_dropped(worker, caplog):
    """A message from an older publisher still carrying credentials: they are not kept."""
    caplog.set_level(logging.DEBUG)
    message = task_message("tests.app.context_info")
    secrets = {"Authorization": "Bearer leaked-token", "Cookie": "c=leaked-cookie", "X-Custom": "kept"}
    message["req_data"]["headers"] = dict(secrets)
    message["req_data"]["user"]["headers"] = dict(secrets)
    task_id = await publish(message)
    state = await wait_status(task_id, TaskStatus.FINISHED)
    assert state["result"]["user"] == "someone"
    assert state["result"]["header"] == "kept"
    assert _leaks(json.dumps(state)) == []
    assert _leaks(caplog.text) == []


def test_redaction_of_every_header_spelling():
    headers = {"AUTHORIZATION": "a", "authorization": "b", "Cookie": "c", "X-Api-Key": "d", "Accept": "e"}
    assert messages.public_headers(headers) == {"Accept": "e"}


# -- REST access --------------------------------------------------------------
USERS: dict[str, dict[str, Any]] = {
    "reader": {"guillotina.AccessContent": Allow, "guillotina.ViewContent": Allow},
    "operator": {
        "guillotina.AccessContent": Allow,
        "guillotina.ViewContent": Allow,
        "guillotina.ManageAMQP": Allow,
    },
}
REST_USERS = pytest.mark.app_settings({"auth_user_identifiers": ["tests.test_security.FakeUsers"]})


class FakeUsers:
    """Test users holding global permissions: a reader, an operator without DebugAMQP."""

    async def get_user(self, token: dict) -> GuillotinaUser | None:
        permissions = USERS.get(token.get("id"))
        if permissions is None:
            return None
        return GuillotinaUser(user_id=token["id"], permissions=dict(permissions))


def as_user(user_id: str) -> dict:
    return {"token": authenticate_user(user_id)[0], "auth_type": "Bearer"}


async def _schedule_in(requester: Any, container: str) -> str:
    body, status = await requester("POST", f"/db/{container}/@test-schedule", data="{}")
    assert status == 200, body
    final = await TaskState(body["task_id"]).join()
    assert final["status"] == TaskStatus.FINISHED, final
    return body["task_id"]


async def _add_container(requester: Any, container_id: str) -> None:
    _, status = await requester(
        "POST", "/db", data=json.dumps({"@type": "Container", "id": container_id, "title": container_id})
    )
    assert status in (200, 201), status


@REST_USERS
async def test_rest_permissions(container_requester, worker):
    async with container_requester as requester:
        task_id = await _schedule_in(requester, "guillotina")
        url = f"/db/guillotina/@amqp-tasks/{task_id}"
        for path in ("/db/guillotina/@amqp-tasks", url, "/db/guillotina/@amqp-info"):
            _, status = await requester("GET", path, authenticated=False)
            assert status == 401, path
            _, status = await requester("GET", path, **as_user("reader"))
            assert status in (401, 403), path
        _, status = await requester("DELETE", url, **as_user("reader"))
        assert status in (401, 403)
        _, status = await requester("DELETE", url, authenticated=False)
        assert status == 401
        assert not await get_state_manager().is_canceled(task_id)

        listed, status = await requester("GET", "/db/guillotina/@amqp-tasks", **as_user("operator"))
        assert status == 200 and listed == [task_id]
        state, status = await requester("GET", url, **as_user("operator"))
        assert status == 200 and state["status"] == TaskStatus.FINISHED
        assert "job_data" not in state
        assert _leaks(json.dumps(state)) == []

        state, status = await requester("GET", url)  # root: a Manager
        assert status == 200 and state["job_data"]["task_id"] == task_id


async def test_rest_refuses_other_containers_tasks(container_requester, worker):
    async with container_requester as requester:
        for container_id in ("a", "a-b"):
            await _add_container(requester, container_id)
        own = await _schedule_in(requester, "a")
        other = await _schedule_in(requester, "a-b")
        guillotina_task = await _schedule_in(requester, "guillotina")
        listed, _ = await requester("GET", "/db/a/@amqp-tasks")
        assert listed == [own]
        listed, _ = await requester("GET", "/db/a-b/@amqp-tasks")
        assert listed == [other]
        for container, task_id in (("a", other), ("a-b", own), ("a", guillotina_task), ("guillotina", own)):
            for method in ("GET", "DELETE"):
                await _assert_not_found(requester, method, f"/db/{container}/@amqp-tasks/{task_id}")
        assert not await get_state_manager().is_canceled(other)
        assert not await get_state_manager().is_canceled(own)


async def _assert_not_found(requester: Any, method: str, path: str) -> None:
    body, status = await requester(method, path)
    assert status == 404, (method, path, status, body)
    assert body == NOT_FOUND or "job_data" not in json.dumps(body), body


@pytest.mark.parametrize(
    "make_id",
    [
        lambda own: "..",
        lambda own: "%2E%2E",
        lambda own: own.replace("task:db-", "task:otherdb-"),
        lambda own: own.replace("-guillotina-", "-guillotina-x-"),
        lambda own: own[: -len("00000000-0000-0000-0000-000000000000")],
        lambda own: own + "0",
        lambda own: own.upper(),
        lambda own: own[:-1],
        lambda own: "task:db-guillotina-" + "a" * 5000,
        lambda own: "lock:" + own,
        lambda own: "cancel",
        lambda own: own.replace("task:", "task%3A", 1) + "%2F..%2F..",
    ],
    ids=[
        "dotdot",
        "encoded-dotdot",
        "other-db",
        "other-container",
        "bare-prefix",
        "suffix",
        "uppercase",
        "truncated",
        "very-long",
        "lock-key",
        "cancel-key",
        "encoded-slash",
    ],
)
async def test_rest_task_id_tricks_are_not_found(container_requester, worker, make_id):
    async with container_requester as requester:
        own = await _schedule_in(requester, "guillotina")
        forged = make_id(own)
        # make sure a forged id that names real state is refused by the id check, not by chance
        if forged.startswith("task:") and is_valid_task_id(forged):
            await get_state_manager().update(forged, {"status": "finished", "result": "secret"})
        for method in ("GET", "DELETE"):
            body, status = await requester(method, f"/db/guillotina/@amqp-tasks/{forged}")
            assert status == 404, (method, status, body)
            assert "secret" not in json.dumps(body)
            assert "job_data" not in json.dumps(body)
        listed, _ = await requester("GET", "/db/guillotina/@amqp-tasks")
        assert listed == [own]


@pytest.mark.app_settings({"databases": {"db-a": {"storage": "DUMMY"}}})
async def test_rest_refuses_tasks_of_a_lookalike_container_in_another_db(container_requester, worker):
    """Ids do not tell db "db" + container "a-x" from db "db-a" + container "x": both are task:db-a-x-..."""
    async with container_requester as requester:
        await _add_container(requester, "a-x")
        _, status = await requester("POST", "/db-a", data=json.dumps({"@type": "Container", "id": "x"}))
        assert status in (200, 201), status
        theirs = await _schedule_in(requester, "a-x")
        body, status = await requester("POST", "/db-a/x/@test-schedule", data="{}")
        assert status == 200, body
        ours = body["task_id"]
        assert (await TaskState(ours).join())["status"] == TaskStatus.FINISHED
        assert theirs.startswith("task:db-a-x-") and ours.startswith("task:db-a-x-")

        listed, _ = await requester("GET", "/db-a/x/@amqp-tasks")
        assert listed == [ours]
        listed, _ = await requester("GET", "/db/a-x/@amqp-tasks")
        assert listed == [theirs]
        for method in ("GET", "DELETE"):
            await _assert_not_found(requester, method, f"/db-a/x/@amqp-tasks/{theirs}")
            await _assert_not_found(requester, method, f"/db/a-x/@amqp-tasks/{ours}")
        state, status = await requester("GET", f"/db-a/x/@amqp-tasks/{ours}")
        assert status == 200 and state["job_data"]["db_id"] == "db-a"
