"""REST behind the dashboard and the `g amqp-tasks` command, on real services (docs/operations.md)."""

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from guillotina_amqp import names, queues
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, TaskStatus
from tests.subprocess_worker import worker_config
from tests.test_rest import create_other_container
from tests.utils import queue_counts, running_worker, wait_for

G = Path(sys.executable).parent / "g"


async def call(requester, func: str, *args: Any, container: str = "guillotina") -> str:
    body = {"func": func, "args": list(args)}
    found, status = await requester("POST", f"/db/{container}/@test-call", data=json.dumps(body))
    assert status == 200, found
    return found["task_id"]


@pytest_asyncio.fixture
async def strict_worker(guillotina_main) -> Any:
    """A worker sending a failed task to the error queue at once (no retries)."""
    async with running_worker(no_retries=True) as worker:
        yield worker


# -- REST ---------------------------------------------------------------------------------


async def test_paged_listing_with_status_filter_and_cursor(container_requester, strict_worker):
    async with container_requester as requester:
        failed = [await call(requester, "fail", "x") for _ in range(3)]
        ok = [await call(requester, "noop") for _ in range(2)]
        for task_id in failed + ok:
            await TaskState(task_id).join()

        async def all_indexed() -> bool:
            # the index is written right after each transition, not in the same atomic step
            found, _ = await requester("GET", "/db/guillotina/@amqp-tasks?limit=10&status=errored")
            return len(found["items"]) == len(failed)

        await wait_for(all_indexed, what="the errored tasks in the index")
        page, status = await requester("GET", "/db/guillotina/@amqp-tasks?limit=2&status=errored")
        assert status == 200 and len(page["items"]) == 2 and page["cursor"]
        rest, _ = await requester(
            "GET", f"/db/guillotina/@amqp-tasks?limit=2&status=errored&cursor={page['cursor']}"
        )
        listed = [task["task_id"] for task in page["items"] + rest["items"]]
        assert sorted(listed) == sorted(failed) and rest["cursor"] is None
        assert {task["status"] for task in page["items"]} == {"errored"}
        assert page["items"][0]["function"] == "tests.app.fail"

        everything, _ = await requester("GET", "/db/guillotina/@amqp-tasks?limit=50")
        assert [task["task_id"] for task in everything["items"]] == (failed + ok)[::-1]
        unpaged, _ = await requester("GET", "/db/guillotina/@amqp-tasks")  # the original's answer
        assert unpaged == (failed + ok)[::-1]


async def test_bad_listing_arguments_answer_400_with_a_reason(container_requester):
    async with container_requester as requester:
        for query, word in (("limit=0", "limit"), ("status=done", "status"), ("cursor=zzz", "cursor")):
            body, status = await requester("GET", f"/db/guillotina/@amqp-tasks?{query}")
            assert status == 400 and word in body["reason"], (query, body)


async def test_retry_reruns_an_errored_task_under_its_id(container_requester, strict_worker, tmp_path):
    fixed = tmp_path / "fixed"
    async with container_requester as requester:
        task_id = await call(requester, "fail_unless_file", str(fixed))
        assert (await TaskState(task_id).join())["status"] == TaskStatus.ERRORED
        await wait_for(lambda: _error_queue_has(1), what="the dead letter")

        fixed.write_text("fixed")
        body, status = await requester("POST", f"/db/guillotina/@amqp-tasks/{task_id}/retry")
        assert status == 200 and body == {"task_id": task_id, "status": "scheduled"}
        final = await TaskState(task_id).join()
        assert final["status"] == TaskStatus.FINISHED and final["result"] == "fixed"
        assert final["job_retries"] == 0 and final.get("error") is None  # a new run: no error of the old


async def _error_queue_has(count: int) -> bool:
    return (await queue_counts())[names.error_queue(get_settings().queue)] == count


async def test_retry_of_a_running_task_is_409_and_of_another_container_404(
    container_requester, strict_worker, tmp_path
):
    async with container_requester as requester:
        await create_other_container(requester)
        task_id = await call(requester, "until_file", str(tmp_path / "go"))
        await wait_for(lambda: _status_is(task_id, TaskStatus.RUNNING), what="running")

        body, status = await requester("POST", f"/db/guillotina/@amqp-tasks/{task_id}/retry")
        assert status == 409 and "running" in body["reason"]
        body, status = await requester("POST", f"/db/other/@amqp-tasks/{task_id}/retry")
        assert status == 404 and body == {"reason": "Task not found"}
        finished = await call(requester, "noop")
        await TaskState(finished).join()
        body, status = await requester("POST", f"/db/guillotina/@amqp-tasks/{finished}/retry")
        assert status == 409 and "finished" in body["reason"]
        (tmp_path / "go").write_text("go")
        await TaskState(task_id).join()


async def _status_is(task_id: str, status: str) -> bool:
    return (await TaskState(task_id).get_state()).get("status") == status


async def test_workers_name_only_this_containers_running_tasks(container_requester, strict_worker, tmp_path):
    async with container_requester as requester:
        await create_other_container(requester)
        mine = await call(requester, "until_file", str(tmp_path / "go"))
        theirs = await call(requester, "until_file", str(tmp_path / "go"), container="other")
        for task_id in (mine, theirs):
            await wait_for(lambda task_id=task_id: _status_is(task_id, TaskStatus.RUNNING), what="running")

        async def announced() -> Any:
            found, _ = await requester("GET", "/db/guillotina/@amqp-workers")
            return found if found and found[0]["running_total"] == 2 else None

        [worker] = await wait_for(announced, what="the worker to announce both tasks")
        assert worker["worker_id"] == strict_worker.worker_id
        assert [task["task_id"] for task in worker["running"]] == [mine]
        assert worker["max_running"] == strict_worker.max_size
        (tmp_path / "go").write_text("go")
        await TaskState(mine).join()
    await strict_worker.stop()
    assert await strict_worker.state_manager.workers() == []  # a worker that stops says so


async def test_queues_report_depths_and_the_chart(container_requester, strict_worker):
    async with container_requester as requester:
        await TaskState(await call(requester, "fail", "x")).join()
        await wait_for(lambda: _error_queue_has(1), what="the dead letter")
        body, status = await requester("GET", "/db/guillotina/@amqp-queues")
        assert status == 200
        depths = {queue["queue"]: queue["messages"] for queue in body["queues"]}
        queue = get_settings().queue
        priority = names.priority_queue(queue)  # where the tasks given a priority wait
        assert depths == {
            queue: 0,
            names.delay_queue(queue): 0,
            names.error_queue(queue): 1,
            priority: 0,
            names.delay_queue(priority): 0,
            names.error_queue(priority): 0,
        }
        assert sum(body["throughput"]["errored"]) == 1


# -- g amqp-tasks -------------------------------------------------------------------------


async def amqp_tasks(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(worker_config()))
    process = await asyncio.create_subprocess_exec(
        str(G),
        "amqp-tasks",
        "-c",
        str(config),
        *args,
        cwd=str(tmp_path),
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def reasons(stderr: str) -> list[str]:
    """The command's own lines on stderr (the rest is the application's logging)."""
    return [line for line in stderr.splitlines() if line.startswith("amqp-tasks:")]


async def test_command_lists_shows_and_names_unknown_ids(container_requester, strict_worker, tmp_path):
    async with container_requester as requester:
        failed = await call(requester, "fail", "boom")
        done = await call(requester, "noop")
        for task_id in (failed, done):
            await TaskState(task_id).join()

    code, out, _ = await amqp_tasks(tmp_path, "list", "--container", "db/guillotina")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["TASK", "ID", "STATUS"]
    assert [line.split()[0] for line in lines] == [done, failed]
    assert header.index("STATUS") == lines[0].index("finished") == lines[1].index("errored")  # aligned

    code, out, _ = await amqp_tasks(tmp_path, "list", "--status", "errored", "--json")
    assert code == 0 and [task["task_id"] for task in json.loads(out)] == [failed]

    code, out, _ = await amqp_tasks(tmp_path, "show", failed, "--json")
    assert code == 0 and json.loads(out)["status"] == "errored"
    code, out, _ = await amqp_tasks(tmp_path, "show", failed)
    assert code == 0 and any(line.split() == ["status", "errored"] for line in out.splitlines())

    for action in ("show", "cancel", "retry"):
        code, out, err = await amqp_tasks(tmp_path, action, "task:db-guillotina-nope")
        assert code == 1 and out == "" and reasons(err) == ["amqp-tasks: no task task:db-guillotina-nope"], (
            action
        )

    code, _, err = await amqp_tasks(tmp_path, "retry", done)
    [reason] = reasons(err)
    assert code == 1 and "only errored or canceled tasks can be retried" in reason


async def test_command_cancels_and_retries(container_requester, strict_worker, tmp_path):
    go = tmp_path / "go"
    async with container_requester as requester:  # the container lives until the retry ran
        task_id = await call(requester, "until_file", str(go))
        await wait_for(lambda: _status_is(task_id, TaskStatus.RUNNING), what="running")

        code, out, _ = await amqp_tasks(tmp_path, "cancel", task_id, "--json")
        assert code == 0 and json.loads(out)["canceled"] is True
        assert (await TaskState(task_id).join())["status"] == TaskStatus.CANCELED

        go.write_text("go")
        code, out, _ = await amqp_tasks(tmp_path, "retry", task_id)
        assert code == 0, out
        await wait_for(lambda: _status_is(task_id, TaskStatus.FINISHED), what="the new run to finish")


async def test_command_dead_letters_list_requeue_and_purge(container_requester, strict_worker, tmp_path):
    fixed = tmp_path / "fixed"
    async with container_requester as requester:  # the container lives until the requeue ran
        retried = await call(requester, "fail_unless_file", str(fixed))
        dropped = await call(requester, "fail", "for ever")
        for task_id in (retried, dropped):
            await TaskState(task_id).join()
        await wait_for(lambda: _error_queue_has(2), what="two dead letters")

        code, out, _ = await amqp_tasks(tmp_path, "dead-letters", "list", "--json")
        assert code == 0 and sorted(letter["task_id"] for letter in json.loads(out)) == sorted(
            [retried, dropped]
        )
        assert await _error_queue_has(2)  # listing leaves them there

        fixed.write_text("fixed")
        code, out, _ = await amqp_tasks(tmp_path, "dead-letters", "requeue", retried)
        assert code == 0 and "requeued 1" in out
        await wait_for(lambda: _status_is(retried, TaskStatus.FINISHED), what="the requeued task to finish")
        assert await _error_queue_has(1)

        code, _, err = await amqp_tasks(tmp_path, "dead-letters", "requeue", retried)
        assert code == 1 and f"no dead letter of task {retried}" in err

        code, out, _ = await amqp_tasks(tmp_path, "dead-letters", "purge")
        assert code == 0 and "purged 1 messages" in out
        code, out, _ = await amqp_tasks(tmp_path, "dead-letters", "requeue", "--all")
        assert code == 0 and "is empty: nothing to requeue" in out


async def test_command_workers_and_queues(container_requester, strict_worker, tmp_path):
    code, out, _ = await amqp_tasks(tmp_path, "workers", "--json")
    assert code == 0 and [w["worker_id"] for w in json.loads(out)] == [strict_worker.worker_id]
    code, out, _ = await amqp_tasks(tmp_path, "workers")
    assert code == 0 and strict_worker.worker_id in out.splitlines()[1]

    code, out, _ = await amqp_tasks(tmp_path, "queues")
    queue = get_settings().queue
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and rows[0] == ["QUEUE", "MESSAGES", "CONSUMERS"]
    priority = names.priority_queue(queue)
    assert rows[1:] == [
        [queue, "0", "1"],
        [names.delay_queue(queue), "0", "0"],
        [names.error_queue(queue), "0", "0"],
        [priority, "0", "1"],
        [names.delay_queue(priority), "0", "0"],
        [names.error_queue(priority), "0", "0"],
    ]
    code, _, err = await amqp_tasks(tmp_path, "queues", "--queue", "has space")
    assert code == 2 and "characters outside" in err


async def test_a_requeue_stopped_half_way_loses_no_message(container_requester, strict_worker, monkeypatch):
    async with container_requester as requester:
        for n in range(3):
            await TaskState(await call(requester, "fail", f"dead {n}")).join()
    await wait_for(lambda: _error_queue_has(3), what="three dead letters")
    await strict_worker.stop()  # requeued copies stay in the main queue to be counted

    published = 0
    publish = queues.Publisher.publish

    async def failing_third(self, *args: Any, **kwargs: Any) -> None:
        nonlocal published
        if published == 2:
            raise ConnectionError("the broker went away")
        await publish(self, *args, **kwargs)
        published += 1

    monkeypatch.setattr(queues.Publisher, "publish", failing_third)
    with pytest.raises(ConnectionError):
        await queues.requeue(get_settings())
    # the third dead letter, unacked, went back when the command's channel closed
    await wait_for(lambda: _error_queue_has(1), what="the third dead letter back in the error queue")
    assert (await queue_counts())[get_settings().queue] == 2
