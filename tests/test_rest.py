"""REST services on containers: @amqp-tasks and its deprecated aliases (docs/operations.md#rest-api)."""

import json

import pytest

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.test_context import TOKEN_USERS, bearer
from tests.utils import running_worker

NOT_FOUND = {"reason": "Task not found"}
UNKNOWN_IN_CONTAINER = "task:db-guillotina-00000000-0000-4000-8000-000000000000"


async def schedule(requester, container: str = "guillotina") -> str:
    """A task scheduled by a service of `container`; its id."""
    body, status = await requester("POST", f"/db/{container}/@test-schedule", data=json.dumps({}))
    assert status == 200
    return body["task_id"]


async def create_other_container(requester) -> None:
    body = {"@type": "Container", "id": "other", "title": "Other"}
    _, status = await requester("POST", "/db", data=json.dumps(body))
    assert status == 200


@pytest.mark.parametrize("service", ["@amqp-tasks", "@amqp-info"])
async def test_list_shows_only_this_containers_tasks(container_requester, service):
    async with container_requester as requester:
        await create_other_container(requester)
        mine = {await schedule(requester), await schedule(requester)}
        theirs = await schedule(requester, "other")
        await add_task(app.noop)  # outside any container

        listed, status = await requester("GET", f"/db/guillotina/{service}")
        assert status == 200
        assert sorted(listed) == sorted(mine)

        listed, status = await requester("GET", f"/db/other/{service}")
        assert status == 200
        assert listed == [theirs]


@pytest.mark.parametrize("service", ["@amqp-tasks", "@amqp-info"])
async def test_get_a_task_state(container_requester, worker, service):
    async with container_requester as requester:
        task_id = await schedule(requester)
        await TaskState(task_id).join()

        state, status = await requester("GET", f"/db/guillotina/{service}/{task_id}")
        assert status == 200
        assert state["status"] == TaskStatus.FINISHED
        assert state["result"]["task_id"] == task_id
        assert state["job_data"]["task_id"] == task_id  # root has guillotina.DebugAMQP
        headers = {name.lower() for name in state["job_data"]["req_data"]["headers"]}
        assert "authorization" not in headers  # the scheduler's credentials never travel


@pytest.mark.parametrize("service", ["@amqp-tasks", "@amqp-cancel"])
async def test_delete_cancels_the_task(container_requester, service):
    async with container_requester as requester:
        task_id = await schedule(requester)

        canceled, status = await requester("DELETE", f"/db/guillotina/{service}/{task_id}")
        assert status == 200
        assert canceled is True

        async with running_worker():
            final = await TaskState(task_id).join()
        assert final["status"] == TaskStatus.CANCELED


@pytest.mark.parametrize(
    "method,service",
    [("GET", "@amqp-tasks"), ("GET", "@amqp-info"), ("DELETE", "@amqp-tasks"), ("DELETE", "@amqp-cancel")],
)
async def test_unknown_and_foreign_tasks_are_not_found(container_requester, method, service):
    async with container_requester as requester:
        await create_other_container(requester)
        theirs = await schedule(requester, "other")
        outside = (await add_task(app.noop)).task_id

        for task_id in (theirs, outside, UNKNOWN_IN_CONTAINER, "nonsense"):
            body, status = await requester(method, f"/db/guillotina/{service}/{task_id}")
            assert (status, body) == (404, NOT_FOUND), task_id

        assert await TaskState(theirs).is_canceled() is False
        assert await TaskState(outside).is_canceled() is False


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "@amqp-tasks"),
        ("GET", "@amqp-tasks/{id}"),
        ("DELETE", "@amqp-tasks/{id}"),
        ("GET", "@amqp-info"),
        ("GET", "@amqp-info/{id}"),
        ("DELETE", "@amqp-cancel/{id}"),
    ],
)
async def test_anonymous_is_refused(container_requester, method, path):
    async with container_requester as requester:
        task_id = await schedule(requester)
        _, status = await requester(method, "/db/guillotina/" + path.format(id=task_id), authenticated=False)
        assert status == 401
        assert await TaskState(task_id).is_canceled() is False


@TOKEN_USERS
async def test_job_data_needs_debug_permission(container_requester, worker):
    async with container_requester as requester:
        task_id = await schedule(requester)
        await TaskState(task_id).join()
        manager = {"token": bearer("ann", ["tests.AMQPManager"]), "auth_type": "Bearer"}

        state, status = await requester("GET", f"/db/guillotina/@amqp-tasks/{task_id}", **manager)
        assert status == 200
        assert state["status"] == TaskStatus.FINISHED
        assert "job_data" not in state

        listed, status = await requester("GET", "/db/guillotina/@amqp-tasks", **manager)
        assert (status, listed) == (200, [task_id])


@TOKEN_USERS
async def test_users_without_manage_permission_are_refused(container_requester):
    async with container_requester as requester:
        task_id = await schedule(requester)
        user = {"token": bearer("bob", ["tests.Scheduler"]), "auth_type": "Bearer"}
        for method, path in (("GET", "@amqp-tasks"), ("GET", f"@amqp-tasks/{task_id}")):
            _, status = await requester(method, f"/db/guillotina/{path}", **user)
            assert status == 401
        _, status = await requester("DELETE", f"/db/guillotina/@amqp-tasks/{task_id}", **user)
        assert status == 401
        assert await TaskState(task_id).is_canceled() is False
