"""The context a task runs in (docs/design.md#running-a-task): container, user, request, transaction."""

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest
from guillotina import app_settings, task_vars
from guillotina.auth.users import RootUser
from guillotina.auth.utils import set_authenticated_user
from guillotina.tests.utils import get_container, get_mocked_request, login

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.utils import wait_for

NO_RETRIES = pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
TOKEN_USERS = pytest.mark.app_settings({"auth_user_identifiers": ["tests.app.TokenUserIdentifier"]})
DATA_TOKEN_USERS = pytest.mark.app_settings({"auth_user_identifiers": ["tests.app.DataTokenUserIdentifier"]})


def bearer(user_id: str, roles: list[str], groups: list[str] = (), **extra: Any) -> str:
    """A JWT for a user that tests.app.TokenUserIdentifier logs in with these roles and groups.

    `extra` claims (`data`, `headers`) are what tests.app.DataTokenUserIdentifier adds to the user.
    """
    claims = {
        "exp": datetime.utcnow() + timedelta(minutes=5),
        "id": user_id,
        "roles": roles,
        "groups": list(groups),
        **extra,
    }
    return jwt.encode(claims, app_settings["jwt"]["secret"], algorithm=app_settings["jwt"]["algorithm"])


async def schedule(requester, service: str, body: dict, **kwargs) -> dict:
    """POST to a scheduling service of the container; the task's final state."""
    response, status = await requester("POST", f"/db/guillotina/{service}", data=json.dumps(body), **kwargs)
    assert status == 200, response
    return await TaskState(response["task_id"]).join()


@TOKEN_USERS
async def test_task_runs_as_the_scheduling_user_in_their_container(container_requester, worker):
    async with container_requester as requester:
        final = await schedule(
            requester,
            "@test-context",
            {"annotation": "noted"},
            token=bearer("alice", ["tests.Scheduler"], ["editors"]),
            auth_type="Bearer",
            headers={"X-Custom": "custom-value"},
        )

    assert final["status"] == TaskStatus.FINISHED
    seen = final["result"]
    assert seen["user"] == "alice"
    assert "tests.Scheduler" in seen["roles"]
    assert "guillotina.Manager" not in seen["roles"]
    assert seen["groups"] == ["editors"]
    assert seen["container"] == "guillotina"
    assert seen["db"] == "db"
    assert seen["url"].endswith("/db/guillotina/@test-context")
    assert seen["method"] == "POST"
    assert seen["header"] == "custom-value"
    assert seen["annotation"] == "noted"


@DATA_TOKEN_USERS
async def test_task_user_has_the_data_and_headers_of_the_scheduling_user(container_requester, worker):
    data = {"email": "alice@example.com", "tenant": {"id": 7, "tags": ["a", "b"]}, "active": True}
    headers = {"X-Tenant": "t-7", "X-Locale": "ca"}
    async with container_requester as requester:
        final = await schedule(
            requester,
            "@test-run",
            {"task": "user_info"},
            token=bearer("alice", ["tests.Scheduler"], data=data, headers=headers),
            auth_type="Bearer",
        )
    assert final["status"] == TaskStatus.FINISHED, final
    assert final["result"] == {"user": "alice", "data": data, "headers": headers}


async def test_task_scheduled_by_root_runs_as_root(container_requester, worker):
    async with container_requester as requester:
        final = await schedule(requester, "@test-context", {})
    assert final["result"]["user"] == "root"
    assert final["result"]["container"] == "guillotina"


async def test_task_outside_a_container_has_a_request_but_no_container(guillotina_main, worker):
    get_mocked_request(path="/some/where", headers={"X-Custom": "outside"})
    task_vars.container.set(None)
    task_vars.db.set(None)
    set_authenticated_user(RootUser("root"))

    final = await (await add_task(app.request_info)).join()

    seen = final["result"]
    assert final["job_data"]["container_id"] is None and final["job_data"]["db_id"] is None
    assert (seen["container"], seen["db"]) == (None, None)
    assert seen["url"].endswith("/some/where")
    assert seen["header"] == "outside"
    assert seen["user"] == "root"


async def test_content_changed_by_a_task_is_committed(container_requester, worker):
    async with container_requester as requester:
        state = await _add_task_in_container(requester, app.create_item, "made-by-task", "From a task")
        final = await state.join()
        assert final["status"] == TaskStatus.FINISHED

        item, status = await requester("GET", "/db/guillotina/made-by-task")
        assert status == 200
        assert item["title"] == "From a task"


async def test_container_layers_and_registry_apply_to_the_task(container_requester, worker):
    async with container_requester as requester:
        before = await (await _add_task_in_container(requester, app.layer_info)).join()
        assert before["result"] == {"layer": False, "record_task_var": None, "record_get_registry": None}

        # the add-on activates tests.app.IAMQPTestLayer and sets a record in the container's registry
        _, status = await requester(
            "POST", "/db/guillotina/@addons", data=json.dumps({"id": "amqp-test-layer"})
        )
        assert status == 200
        after = await (await _add_task_in_container(requester, app.layer_info)).join()

    assert after["status"] == TaskStatus.FINISHED, after
    assert after["result"] == {
        "layer": True,
        "record_task_var": "set in guillotina",
        "record_get_registry": "set in guillotina",
    }


async def test_request_futures_run_after_the_commit(container_requester, worker):
    """A future the task registers runs, and by then the task's change is committed."""
    item_id = f"future-{uuid.uuid4().hex[:8]}"
    async with container_requester as requester:
        state = await _add_task_in_container(requester, app.create_item_with_future, item_id, "With a future")
        final = await state.join()
        assert final["status"] == TaskStatus.FINISHED, final

        ran = await wait_for(
            lambda: [seen for seen in app.FUTURES_RAN if seen["item"] == item_id], 30, "the request future"
        )
    assert ran == [{"item": item_id, "visible": True}]


@NO_RETRIES
async def test_failed_task_changes_nothing(container_requester, worker):
    """The worker aborts the transaction of a task that raised."""
    async with container_requester as requester:
        state = await _add_task_in_container(requester, app.create_item_then_fail, "not-made", "lost")
        final = await state.join()
        assert final["status"] == TaskStatus.ERRORED
        assert "RuntimeError: failing after writing" in final["error"]

        _, status = await requester("GET", "/db/guillotina/not-made")
        assert status == 404


async def _add_task_in_container(requester, func, *args) -> TaskState:
    await enter_container(requester)
    return await add_task(func, *args)


async def enter_container(requester) -> Any:
    """Be code running as root inside container "guillotina" (as a service or subscriber is)."""
    login(user=RootUser("root"))
    get_mocked_request(db=requester.db)
    return await get_container(requester=requester)
