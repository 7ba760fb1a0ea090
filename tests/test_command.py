"""`g amqp-worker` flags (docs/operations.md): --help, --max-running-tasks, its start-up log line."""

import re

from guillotina_amqp import add_task
from guillotina_amqp.liveness import EXIT_LOOP_BLOCKED, EXIT_OK
from guillotina_amqp.state import TaskStatus
from tests import app
from tests.subprocess_worker import WorkerProcess, worker_config
from tests.utils import queue_counts, wait_for


async def test_help_says_the_auto_kill_timeout_is_in_seconds(guillotina_main):
    async with WorkerProcess(worker_config(), "--help") as worker:
        assert await worker.wait_exit(60) == EXIT_OK
    text = " ".join(worker.output.split())
    for flag in ("--auto-kill-timeout", "--max-running-tasks", "--metrics-server", "--port"):
        assert flag in text
    assert re.search(r"--auto-kill-timeout \S+ seconds the event loop may stay blocked", text), text
    assert f"killed with exit code {EXIT_LOOP_BLOCKED}" in text


async def test_start_logs_queue_prefetch_state_manager_and_worker_id(guillotina_main):
    async with WorkerProcess(worker_config(persistent_manager="redis")) as worker:
        await worker.wait_consuming()
        queue = worker_config()["amqp"]["queue"]
        assert re.search(
            rf"Worker [0-9a-f]{{32}} consuming {queue} \(prefetch 20, state manager redis\)", worker.output
        ), worker.output


async def test_worker_skips_hashing_the_root_password(guillotina_main):
    # the argon2 hash of root_user.password is most of a worker's start-up; no one logs in there
    assert await app.root_password_set()  # this (API) process has it
    async with WorkerProcess(worker_config(persistent_manager="redis")) as worker:
        await worker.wait_consuming()
        final = await (await add_task(app.root_password_set)).join(timeout=60)
    assert (final["status"], final["result"]) == (TaskStatus.FINISHED, False)


async def test_max_running_tasks_flag_overrides_setting_and_prefetch(guillotina_main, tmp_path):
    gate = tmp_path / "go"
    config = worker_config(max_running_tasks=5)
    async with WorkerProcess(config, "--max-running-tasks", "2") as worker:
        await worker.wait_consuming()
        assert "(prefetch 2," in worker.output
        states = [await add_task(app.wait_then_log, str(gate)) for _ in range(6)]

        async def statuses() -> list[str]:
            return sorted([await state.get_status() for state in states])

        async def two_running_four_ready() -> bool:
            ready = (await queue_counts())[config["amqp"]["queue"]]
            return ready == 4 and await statuses() == ["running"] * 2 + ["scheduled"] * 4

        # prefetch 2: the broker keeps the other 4 messages ready in the queue
        await wait_for(two_running_four_ready, 60, "2 tasks running and 4 left in the queue")
        gate.touch()
        finals = [await state.join() for state in states]
    assert [final["status"] for final in finals] == [TaskStatus.FINISHED] * 6
