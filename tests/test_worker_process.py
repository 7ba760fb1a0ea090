"""A real `g amqp-worker` process runs what the test process schedules."""

import json

from guillotina_amqp import add_task
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config


async def test_worker_process_runs_tasks(guillotina_main):
    async with WorkerProcess(worker_config()) as worker:
        await worker.wait_consuming()
        states = [await add_task(app.add, i, i) for i in range(5)]
        results = [await state.join() for state in states]
    assert [r["status"] for r in results] == [TaskStatus.FINISHED] * 5
    assert [r["result"] for r in results] == [0, 2, 4, 6, 8]


async def test_worker_process_changes_content_in_postgres(pg_database, container_requester):
    async with container_requester as requester:
        _, status = await requester(
            "POST", "/db/guillotina", data=json.dumps({"@type": "Item", "id": "item", "title": "old"})
        )
        assert status == 201
        async with WorkerProcess(worker_config()) as worker:
            await worker.wait_consuming()
            body, status = await requester(
                "POST",
                "/db/guillotina/@test-schedule",
                data=json.dumps({"kind": "object", "id": "item", "title": "new"}),
            )
            assert status == 200, body
            from guillotina_amqp.state import TaskState

            final = await TaskState(body["task_id"]).join()
            assert final["status"] == TaskStatus.FINISHED, final
        item, _ = await requester("GET", "/db/guillotina/item")
        assert item["title"] == "new"
