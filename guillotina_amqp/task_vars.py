"""Context variables of a running task."""

from contextvars import ContextVar
from typing import Any

#: The job being run on this worker: `amqp_job.get().data["task_id"]` is its task id.
amqp_job: ContextVar[Any] = ContextVar("amqp_job", default=None)
