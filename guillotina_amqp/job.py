"""One task message, run inside its Guillotina context, turned into an Outcome.

decode (worker) -> resolve the function -> rebuild request, db, container, user
-> call it inside a transaction -> commit, run request futures -> Outcome.
The worker alone decides what an Outcome means for the message (ack, retry, error queue).
"""

import asyncio
import enum
import inspect
import logging
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from guillotina.component import get_utility
from guillotina.interfaces import IApplication

from guillotina_amqp import context, offload, registry, tracing
from guillotina_amqp.exceptions import (
    ContainerNotFound,
    Discard,
    Fail,
    ObjectNotFoundException,
    Reject,
    ResultNotStorable,
    Retry,
    TaskControl,
    TaskTimeout,
)
from guillotina_amqp.interfaces import MessageType
from guillotina_amqp.names import OBJECT_TASK_WRAPPERS, task_name
from guillotina_amqp.settings import AMQPSettings, get_settings
from guillotina_amqp.state.manager import StateManager, get_state_manager
from guillotina_amqp.task_vars import amqp_job

logger = logging.getLogger("guillotina_amqp")


def dotted_name_of(message: dict) -> str:
    """The function of a task message as metrics, logs and the dashboard show it."""
    return task_name(message.get("func") or "", message.get("args") or ())


class Outcome(enum.Enum):
    FINISHED = "finished"
    ERRORED = "errored"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"  # worker shutting down: leave the message for redelivery
    # the task steered its message by raising (docs/tasks.md#steering-the-message-from-inside-a-task)
    RETRY = "retry"
    REJECTED = "rejected"
    DISCARDED = "discarded"
    FAILED = "failed"


_STEERED = {Retry: Outcome.RETRY, Reject: Outcome.REJECTED, Discard: Outcome.DISCARDED, Fail: Outcome.FAILED}


class Job:
    """A decoded message and what running it produced.

    `Job(data, settings, state_manager)`; the original plugin's call shape
    `Job(base_request, data, channel, envelope)` works too: the settings and state
    manager are then this process's (looked up on first use), and the other three are kept as attributes
    (the request is rebuilt from the message; the worker settles the message).
    """

    base_request: Any = None
    channel: Any = None
    envelope: Any = None

    def __init__(
        self, data: Any, settings: Any, state_manager: Any = None, envelope: Any = None, headers: Any = None
    ) -> None:
        if not isinstance(settings, AMQPSettings):  # the original's shape, told by its 2nd argument
            self.base_request, self.channel, self.envelope = data, state_manager, envelope
            data, settings, state_manager = settings, None, None
        self.data: dict[str, Any] = data
        self._settings: AMQPSettings | None = settings
        self._state_manager: StateManager | None = state_manager
        self._func: Callable[..., Any] | None = None
        self.result: Any = None
        self.error: str | None = None
        #: what the run raised (a TaskControl the task steered its message with, or its failure)
        self.exception: BaseException | None = None
        self.cancel_requested = False
        self.started: float | None = None
        self.retries = 0
        #: the message's headers (the trace context of the publish, when traced)
        self.headers: dict | None = headers

    @property
    def settings(self) -> AMQPSettings:
        """The worker's settings; this process's for a Job built in the original's shape."""
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    @property
    def state_manager(self) -> StateManager:
        if self._state_manager is None:
            self._state_manager = get_state_manager()
        return self._state_manager

    def resolve(self) -> Callable[..., Any]:
        """The function to run; TaskNotAllowed/InvalidMessage when it may not or cannot run.

        Checked when the job is about to run, not when it is built: naming a job's
        function (`dotted_name`, logs, metrics) never imports anything.
        """
        if self._func is None:
            func = registry.resolve(self.data["func"], self.settings)
            if self.is_object_task:
                if not self.data["args"]:
                    raise registry.InvalidMessage("object task without its callable", self.task_id)
                registry.resolve(self.data["args"][0], self.settings)
            self._func = func
        return self._func

    @property
    def func(self) -> Callable[..., Any]:
        return self.resolve()

    @property
    def task_id(self) -> str:
        return self.data["task_id"]

    @property
    def run_id(self) -> str:
        """Which run of the task id this message is ("" for messages of the original plugin)."""
        return self.data.get("run", "")

    @property
    def timeout(self) -> float | None:
        """The run's time limit in seconds: the message's, else `amqp.task_timeout`."""
        timeout = self.data.get("timeout")
        return timeout if timeout is not None else self.settings.task_timeout

    @property
    def max_retries(self) -> int | None:
        """The message's own retry limit; None: the worker's `max_task_retries`."""
        return self.data.get("max_retries")

    @property
    def is_object_task(self) -> bool:
        return self.data["func"] in OBJECT_TASK_WRAPPERS

    @property
    def dotted_name(self) -> str:
        """The function's name as metrics and logs show it."""
        return task_name(self.data["func"], self.data.get("args") or ())

    #: the original plugin's name for dotted_name
    function_name = dotted_name

    @property
    def label(self) -> str:
        """How log lines name the task: its id and its function."""
        return f"Task {self.task_id} ({self.dotted_name})"

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started if self.started is not None else 0.0

    def __repr__(self) -> str:
        return f"<Job {self.task_id} {self.dotted_name}>"

    async def run(self) -> Outcome:
        """Run the task; never raises except to let the worker's shutdown through."""
        with tracing.run_span(self, self.headers) as span:
            outcome = await self._outcome()
            tracing.ended(span, self, outcome)
            return outcome

    async def _outcome(self) -> Outcome:
        self.started = time.monotonic()
        amqp_job.set(self)
        try:
            self.result = await self._run_limited()
            return Outcome.FINISHED
        except TaskControl as exc:
            return self._steered(exc)
        except ObjectNotFoundException as exc:
            return self._gone(exc)
        except ContainerNotFound as exc:
            if self.is_object_task:
                return self._gone(exc)  # its object went with the container
            return self._failed()
        except asyncio.CancelledError:
            if self.cancel_requested:
                return Outcome.CANCELED
            return Outcome.INTERRUPTED
        except Exception:
            return self._failed()

    def _gone(self, exc: Exception) -> Outcome:
        logger.warning("%s: %s; finishing without result", self.label, exc)
        self.result = None
        return Outcome.FINISHED

    def _steered(self, exc: TaskControl) -> Outcome:
        self.exception = exc
        self.error = str(exc)
        logger.info("%s raised %s: %s", self.label, type(exc).__name__, exc)
        for kind, outcome in _STEERED.items():
            if isinstance(exc, kind):
                return outcome
        return self._failed()  # a bare TaskControl steers nothing: a failure

    def _failed(self) -> Outcome:
        self.exception = sys.exc_info()[1]
        self.error = traceback.format_exc()
        logger.error("%s failed:\n%s", self.label, self.error)
        return Outcome.ERRORED

    async def _run_limited(self) -> Any:
        """The run, cancelled past its time limit (TaskTimeout); the loop serves others meanwhile."""
        if self.timeout is None:
            return await self._run_in_context()
        limit = asyncio.timeout(self.timeout)
        try:
            async with limit:
                return await self._run_in_context()
        except TimeoutError:
            if limit.expired():
                raise TaskTimeout(self.timeout) from None
            raise

    async def _run_in_context(self) -> Any:
        req_data = self.data.get("req_data") or {}
        request = context.rebuild_request(req_data)
        db_id, container_id = self.data.get("db_id"), self.data.get("container_id")
        if not db_id:
            context.login(req_data)
            result = await self._call()
            request.execute_futures()
            return result
        db = await context.open_database(db_id)
        tm = db.get_transaction_manager()
        txn = await tm.begin()
        committed = False
        try:
            root = await tm.get_root(txn=txn)
            if container_id:
                await context.enter_container(request, root, container_id)
            context.login(req_data)
            result = await self._call()
            await tm.commit(txn=txn)
            committed = True
            request.execute_futures()
            return result
        finally:
            if not committed:
                await tm.abort(txn=txn)

    async def _call(self) -> Any:
        """The task's result, checked storable before the transaction commits."""
        args, kwargs = self.data["args"], self.data["kwargs"]
        if inspect.isasyncgenfunction(self.func):
            result = await self._consume(self.func(*args, **kwargs))
        elif self.data.get("run_in"):
            result = await offload.call(self.func, self.data)  # a plain def, off the loop
        else:
            result = self.func(*args, **kwargs)
            if inspect.isasyncgen(result):
                result = await self._consume(result)
            elif inspect.isawaitable(result):
                result = await result
        try:
            orjson.dumps(result)
        except TypeError as exc:
            raise ResultNotStorable(
                f"the result of {self.dotted_name} cannot be stored as JSON: {exc}"
            ) from None
        return result

    async def _consume(self, generator: Any) -> list | None:
        """Collect RESULT yields in order; append DEBUG yields to the event log as they come."""
        results: list = []
        async for item in generator:
            kind = _message_type(item)
            if kind is MessageType.RESULT:
                results.append(item[1])
            elif kind is MessageType.DEBUG:
                await self.log_event(str(item[1]))
            else:
                logger.warning("%s yielded %r: ignored", self.label, item)
        return results or None

    async def log_event(self, text: str) -> None:
        entry = [datetime.now(timezone.utc).isoformat(), text]
        await self.state_manager.append_event(self.task_id, entry, self.settings.max_eventlog)


def _message_type(item: Any) -> MessageType | None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return None
    try:
        return MessageType(item[0])
    except ValueError:
        return None


def root_object() -> Any:
    return get_utility(IApplication, name="root")
