"""The per-task options, declared once (options.TaskOptions, docs/tasks.md#options), as their
users meet them: add_task's keywords, @task's options and the documentation's table."""

import inspect
import re
from pathlib import Path

import pytest

from guillotina_amqp import add_task, options, task
from tests import app

TASKS_DOC = Path(__file__).resolve().parent.parent / "docs" / "tasks.md"


def test_add_task_shows_every_options_keyword_as_it_always_did():
    parameters = inspect.signature(add_task).parameters
    assert set(parameters) == {
        *("func", "args", "_request", "_retries", "_task_id", "kwargs"),
        *("_timeout", "_max_retries", "_countdown", "_eta", "_queue", "_priority", "_expires", "_run_in"),
    }
    assert list(parameters)[-1] == "kwargs"  # the task's own keywords: what no option took
    assert parameters["_eta"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["_eta"].default is None


def test_an_unknown_decorator_option_is_told_with_every_option_task_takes():
    known = "timeout, max_retries, priority, expires, run_in, queue"
    message = f"unknown task option 'countdown' (known: {known})"
    with pytest.raises(ValueError, match=re.escape(message)):
        task(app.add, countdown=5)


async def test_option_keywords_are_taken_out_of_the_tasks_own_keywords(worker):
    state = await add_task(app.add, 1, b=2, _timeout=30, _priority=0, _expires=600)

    final = await state.join(timeout=30)
    assert final["result"] == 3
    assert final["job_data"]["kwargs"] == {"b": 2}
    assert (final["job_data"]["timeout"], final["job_data"]["priority"]) == (30.0, 0)


@pytest.mark.parametrize("field", list(options.TABLE))
def test_the_documented_table_names_every_option(field):
    row = next((line for line in TASKS_DOC.read_text().splitlines() if f"| `{field}`" in line), None)
    assert row is not None, f"docs/tasks.md#options has no row for the field {field}"
    assert all(f"`{keyword}=`" in row for keyword in options.TABLE[field].call), row
    assert (f"`{field}=`" in row) is options.TABLE[field].on_task, row
