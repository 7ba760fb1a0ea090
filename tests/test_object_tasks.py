"""Object tasks: the worker re-loads the object by its path and calls the task on it (README)."""

import json

import pytest
from guillotina.transactions import transaction

from guillotina_amqp import add_object_task
from guillotina_amqp.state import TaskState, TaskStatus
from tests import app
from tests.test_context import enter_container
from tests.test_security import publish, task_message
from tests.utils import queue_counts, running_worker


async def create_doc(requester, title: str = "Original") -> None:
    body = {"@type": "Item", "id": "doc", "title": title}
    _, status = await requester("POST", "/db/guillotina", data=json.dumps(body))
    assert status == 201


async def title_of_doc(requester) -> str:
    item, status = await requester("GET", "/db/guillotina/doc")
    assert status == 200
    return item["title"]


async def schedule_on_doc(requester, func, *args) -> TaskState:
    """add_object_task(func, doc, *args) from code running inside the container."""
    return await on_doc(requester, lambda doc: add_object_task(func, doc, *args))


async def on_doc(requester, schedule) -> TaskState:
    container = await enter_container(requester)
    async with transaction(db=requester.db):
        return await schedule(await container.async_get("doc"))


async def test_object_task_changes_the_object(container_requester, worker):
    async with container_requester as requester:
        await create_doc(requester)
        final = await (await schedule_on_doc(requester, app.set_title, "Changed by a task")).join()

        assert final["status"] == TaskStatus.FINISHED
        assert final["result"] == "Changed by a task"
        assert final["job_data"]["func"] == "guillotina_amqp.utils._run_object_task"
        assert final["job_data"]["args"][:2] == ["tests.app.set_title", "/doc"]
        assert await title_of_doc(requester) == "Changed by a task"


async def test_object_task_scheduled_from_a_service(container_requester, worker):
    async with container_requester as requester:
        await create_doc(requester)
        body = {"kind": "object", "id": "doc", "title": "From a service"}
        response, status = await requester("POST", "/db/guillotina/@test-schedule", data=json.dumps(body))
        assert status == 200
        await TaskState(response["task_id"]).join()
        assert await title_of_doc(requester) == "From a service"


async def test_async_generator_object_task(container_requester, worker):
    async with container_requester as requester:
        await create_doc(requester, title="a")
        final = await (await schedule_on_doc(requester, app.titles, "b", "c")).join()

        assert final["status"] == TaskStatus.FINISHED
        assert final["result"] == ["ab", "abc"]
        assert final["job_data"]["func"] == "guillotina_amqp.utils._yield_object_task"
        assert await title_of_doc(requester) == "abc"


async def test_decorated_object_task(container_requester, worker):
    async with container_requester as requester:
        await create_doc(requester)
        final = await (await on_doc(requester, lambda doc: app.decorated_set_title(doc, "Decorated"))).join()

        assert final["result"] == "Decorated"
        assert await title_of_doc(requester) == "Decorated"


@pytest.mark.parametrize("func", [app.set_title, app.titles], ids=["coroutine", "async-generator"])
async def test_object_deleted_before_the_task_ran(container_requester, func):
    async with container_requester as requester:
        await create_doc(requester)
        state = await schedule_on_doc(requester, func, "Never")
        _, status = await requester("DELETE", "/db/guillotina/doc")
        assert status == 200

        async with running_worker():
            final = await state.join()

        assert final["status"] == TaskStatus.FINISHED
        assert final["result"] is None
        assert final.get("job_retries", 0) == 0
        assert set((await queue_counts()).values()) == {0}  # acked: neither retried nor dead-lettered


@pytest.mark.app_settings({"amqp": {"max_task_retries": 0}})
async def test_task_of_a_database_the_worker_lacks_errors(guillotina_main):
    # unlike a deleted object, a missing database is the worker's configuration: never "finished"
    message = task_message("tests.app.add", 1, 2)
    message.update(db_id="no-such-db", container_id="guillotina")
    task_id = await publish(message)
    async with running_worker():
        final = await TaskState(task_id).join()
    assert final["status"] == TaskStatus.ERRORED
    assert "DatabaseNotFound: no-such-db" in final["error"]
