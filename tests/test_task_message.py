"""The task message's fields, declared once (types.TaskMessage) and read by the worker's checks."""

import typing

from guillotina_amqp import message as messages
from guillotina_amqp import options
from guillotina_amqp.types import TaskMessage


def test_the_worker_accepts_exactly_the_declared_fields():
    assert messages.FIELDS == {
        *("func", "args", "kwargs", "db_id", "container_id", "task_id", "req_data", "run", "queue"),
        *("timeout", "max_retries", "priority", "eta", "expires", "run_in", "issued"),
    }
    assert set(options.TABLE) <= messages.FIELDS  # every per-task option travels as a field
    assert messages.REQUIRED_FIELDS == ("func", "task_id")


def test_the_declaration_types_every_field():
    hints = typing.get_type_hints(TaskMessage)
    assert set(hints) == messages.FIELDS
    assert hints["task_id"] is str and hints["eta"] is float
