"""Errors raised by guillotina_amqp (SPEC §1)."""


class AMQPError(Exception):
    """Base class of every guillotina_amqp error."""


class TaskNotFoundException(AMQPError, KeyError):
    """No state is known for this task id."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"Task not found: {self.task_id}"


class TaskNotFinishedException(AMQPError):
    """The task has no result yet: it is neither finished nor errored."""


class TaskAlreadyAcquired(AMQPError):
    """Another worker holds the task's lock."""


class TaskAccessUnauthorized(AMQPError, PermissionError):
    """The task's lock belongs to another worker."""


class TaskMaxRetriesReached(AMQPError):
    """The task failed `max_task_retries` times and goes to the error queue."""


class ObjectNotFoundException(AMQPError, LookupError):
    """The object an object task runs on no longer exists."""


class AMQPConfigurationNotFoundError(AMQPError):
    """The application settings have no `amqp` block."""


class InvalidMessage(AMQPError, ValueError):
    """A message from the queue cannot be run (poison message); `reason` says why."""

    def __init__(self, reason: str, task_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id


class MessageRefused(AMQPError, ValueError, TypeError):
    """add_task cannot send this call: its arguments are not JSON or the message is too large.

    A TypeError too, as the original raised for arguments JSON could not hold.
    """


class TaskStateUnusable(AMQPError):
    """The task's Redis key holds something that is not a task state (a poison message's doing)."""


class ResultNotStorable(AMQPError, TypeError):
    """A task returned a value JSON cannot hold (a set, bytes...): the run counts as failed."""


class ContainerNotFound(AMQPError, LookupError):
    """The container a task was scheduled in no longer exists."""


class TaskNotAllowed(InvalidMessage):
    """The message names a function the worker refuses to import."""


class StateManagerUnavailable(AMQPError, ConnectionError):
    """The configured state manager cannot be reached or is misconfigured."""


class MessageNotRouted(AMQPError):
    """RabbitMQ confirmed a publish it could not route to any queue (the queue is missing)."""


class InvalidSettings(AMQPError, ValueError):
    """A setting cannot be read as its declared type; the message names it (never a secret's value)."""


class Fail(AMQPError):
    """Raised by a task: it failed for good, errored now, no retry (its message goes to the error queue)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
