"""An application declaring a periodic task, loaded only by the worker processes of
tests/test_periodic.py (never imported by the test process: its workers would fire it)."""

import os
from typing import Any

from guillotina import configure

from guillotina_amqp import periodic
from guillotina_amqp.task_vars import amqp_job
from tests.app import PERIODIC_MARKS_ENV

app_settings: dict[str, Any] = {}


def includeme(root: Any, settings: dict) -> None:
    configure.scan("tests.periodic_app")


@periodic(every=1)
async def every_second() -> str:
    task_id = amqp_job.get().data["task_id"]
    with open(os.environ[PERIODIC_MARKS_ENV], "a") as fh:
        fh.write(f"{task_id} {os.getpid()}\n")
    return task_id
