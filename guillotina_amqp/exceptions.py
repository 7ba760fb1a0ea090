"""Errors raised by guillotina_amqp (docs/design.md#public-api)."""


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


class RunFromTheFuture(TaskStateUnusable):
    """A message's run is later than the state store's clock could have made: a forgery, refused
    (into the error queue) so that it never orders the later runs of its task id."""

    def __init__(self, task_id: str, run: str) -> None:
        super().__init__(f"task {task_id}: run {run[:40]!r} is later than the state store's clock allows")


class ResultNotStorable(AMQPError, TypeError):
    """A task returned a value JSON cannot hold (a set, bytes...): the run counts as failed."""


class ContainerNotFound(AMQPError, LookupError):
    """The container a task was scheduled in no longer exists."""


class TaskNotAllowed(InvalidMessage):
    """The message names a function the worker refuses to import."""


class StateManagerUnavailable(AMQPError, ConnectionError):
    """The configured state manager cannot be reached or is misconfigured."""


class TLSFailure(AMQPError, ConnectionError):
    """A TLS connection could not be made (a certificate that does not verify, a plain-TCP port):
    never retried over plain TCP; the message names the address and the setting, never a secret."""


class MessageNotRouted(AMQPError):
    """RabbitMQ confirmed a publish it could not route to any queue (the queue is missing)."""


class InvalidSettings(AMQPError, ValueError):
    """A setting cannot be read as its declared type; the message names it (never a secret's value)."""


class TaskTimeout(AMQPError, TimeoutError):
    """A run went past its `timeout`: it was cancelled and counts as a failure."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the task ran longer than its time limit (timeout={timeout:g}s) and was cancelled")
        self.timeout = timeout


class TaskErrored(AMQPError):
    """`TaskState.result()` of an errored task; the message is the stored `error` (its traceback)."""


class TaskCanceled(AMQPError):
    """`TaskState.result()` of a canceled task; the message is the stored `error`, if any."""


def _seconds(name: str, value: float | None) -> float | None:
    """A delay in seconds as given to Retry/Reject: None or a non-negative finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a non-negative number of seconds or None, not {value!r}")
    return float(value)


class TaskControl(AMQPError):
    """Raised by a task to steer its own message instead of failing (docs/tasks.md)."""


class Retry(TaskControl):
    """Run the task again after `delay` seconds (None: the retry policy's delay).

    Counted like a failure against `max_retries`; `reason` is recorded in `error`.
    """

    def __init__(self, delay: float | None = None, reason: str | None = None) -> None:
        self.delay = _seconds("Retry(delay=)", delay)
        self.reason = reason
        super().__init__(reason or "retry requested")


class Reject(TaskControl):
    """Give the message back for another worker, after `delay` seconds (None: at once).

    Not a failure: `job_retries` stays, the task is `scheduled` again.
    """

    def __init__(self, delay: float | None = None) -> None:
        self.delay = _seconds("Reject(delay=)", delay)
        super().__init__("rejected" if delay is None else f"rejected for {delay:g}s")


class Discard(TaskControl):
    """Drop the message: the task ends `canceled` with `reason` in `error`, never retried."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        super().__init__(reason or "discarded")


class Fail(TaskControl):
    """The task failed for good: it ends `errored` with `reason` in `error`, never retried
    (its message goes to the error queue)."""

    def __init__(self, reason: str) -> None:
        self.reason = str(reason)
        super().__init__(self.reason)
